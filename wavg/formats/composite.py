"""Checkpoints stored as several HDF5 files: one `Checkpoint` over the union of their tensors.

A sharded ``.weights.json`` and an unzipped ``.keras`` folder both keep their weights in
plain HDF5 files; each is opened as an `H5Checkpoint` (so every part gets the same safe walk
and checks as a stand-alone file) and reads are delegated to the part holding the tensor.
Parts keep descriptors open only within the process's budget (`wavg.storage.descriptors`).
This module never parses an index or a folder and never commits an output: its subclasses do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from wavg.errors import CheckpointError
from wavg.formats.base import Checkpoint, Tensor, Writer, slots
from wavg.formats.h5file import H5Checkpoint
from wavg.formats.layouts import Layout
from wavg.storage.bytesource import ByteSource
from wavg.storage.descriptors import OPEN_FILES


class PartFiles:
    """The `InputSource` of a checkpoint of several files.

    `files` are every file the checkpoint was read from (index, shards, copied members):
    all are checked for changes, and `keep_open` reaches every part (unless the parts got
    no room in the descriptor budget: then they reopen per read whatever the core says).
    """

    def __init__(self, path: str, files: list[ByteSource], parts_open: bool) -> None:
        self.path = path
        self._files = files
        self._parts_open = parts_open
        self._keep_open = True

    @property
    def keep_open(self) -> bool:
        return self._keep_open

    @keep_open.setter
    def keep_open(self, value: bool) -> None:
        self._keep_open = value
        for file in self._files:
            file.keep_open = value and self._parts_open

    @property
    def files(self) -> list[ByteSource]:
        return list(self._files)

    @property
    def bytes_fetched(self) -> int:
        return sum(file.bytes_fetched for file in self._files)

    @property
    def requests(self) -> int:
        return sum(file.requests for file in self._files)

    def check_unchanged(self) -> None:
        for file in self._files:
            file.check_unchanged()

    def release(self) -> None:
        for file in self._files:
            file.release()


class PartTensors(dict):
    """The union of the parts' tensors; replacing one (the core may re-flag a tensor as
    written by it) replaces it in its part too, so that part's writer sees the change."""

    def __init__(self) -> None:
        super().__init__()
        self.owners: dict[str, H5Checkpoint] = {}

    def __setitem__(self, name: str, tensor: Tensor) -> None:
        super().__setitem__(name, tensor)
        part = self.owners.get(name)
        if part is not None:
            part.tensors[name] = tensor


class CompositeCheckpoint(Checkpoint):
    """A checkpoint whose tensors live in several HDF5 parts (name -> `H5Checkpoint`).

    Tensor names are unique across parts (a subclass refuses duplicates before calling
    `_set_parts`); `tensors` is their union and each read goes to the part holding it.
    """

    def __init__(self, path: str, layout: Layout, extra_files: list[ByteSource]) -> None:
        super().__init__(PartFiles(path, list(extra_files), parts_open=True), layout)
        self.tensors = PartTensors()
        self.parts: list[tuple[str, H5Checkpoint]] = []
        self._owner = self.tensors.owners
        self._extra_files = extra_files
        self._reserved = 0

    def _open_part(self, file: ByteSource, layout: Layout) -> H5Checkpoint:
        """Open one part as an HDF5 checkpoint; its errors name its own file."""
        part = H5Checkpoint(file, layout)
        part.trim()
        return part

    def _set_parts(self, parts: list[tuple[str, H5Checkpoint]]) -> None:
        self.parts = parts
        for _, part in parts:
            for name, tensor in part.tensors.items():
                if name in self._owner:
                    raise CheckpointError(
                        part.path, f"tensor {name} is also in {self._owner[name].path}"
                    )
                self._owner[name] = part
                self.tensors[name] = tensor
        parts_open = OPEN_FILES.take(len(parts))
        self._reserved = len(parts) if parts_open else 0
        if not parts_open:
            for _, part in parts:
                part.file.keep_open = False
                part.release()
        files = [*self._extra_files, *(part.file for _, part in parts)]
        self.file = PartFiles(self.path, files, parts_open)

    def part_of(self, name: str) -> H5Checkpoint:
        """The part holding tensor `name` (its HDF5 object is there)."""
        return self._owner[name]

    def read(
        self, tensor: Tensor, start: int, count: int, slices: tuple[slice, ...], scratch: np.ndarray
    ) -> np.ndarray:
        return self._owner[tensor.name].read(tensor, start, count, slices, scratch)

    def read_many(self, tensors: Sequence[Tensor], out: np.ndarray) -> None:
        """Each part reads its own tensors' slots (its vectored reads)."""
        by_part: dict[int, list[tuple[Tensor, np.ndarray]]] = {}
        for tensor, slot in slots(tensors, out):
            by_part.setdefault(id(self._owner[tensor.name]), []).append((tensor, slot))
        for _, part in self.parts:
            targets = by_part.get(id(part))
            if targets:
                part.read_slots(targets)

    def will_read(self, names: list[str], readers: int = 1) -> None:
        for _, part in self.parts:
            part.will_read([n for n in names if self._owner.get(n) is part], readers)

    def trim(self) -> None:
        for _, part in self.parts:
            part.trim()

    def release(self) -> None:
        for _, part in self.parts:
            part.release()
        for file in self._extra_files:
            file.release()

    def close(self) -> None:
        for _, part in self.parts:
            part.close()
        OPEN_FILES.give_back(self._reserved)
        self._reserved = 0
        for file in self._extra_files:
            file.keep_open = False
            file.release()


class PartsWriter(Writer):
    """One writer per output part; each averaged block goes to the part that holds it.

    `order` is the parts' own orders one after the other, so every part is written in one
    sequential pass. `on_finish`, run once the parts are on disk, writes what else the
    output needs (an index, copied files) and returns its size in bytes.
    """

    def __init__(self, writers: list[Writer], on_finish: Callable[[], int] | None = None) -> None:
        self._writers = writers
        self._route: dict[str, Writer] = {}
        self.order = []
        for writer in writers:
            for name in writer.order:
                self._route[name] = writer
                self.order.append(name)
        self._on_finish = on_finish

    def write(self, tensor: Tensor, start: int, data: np.ndarray) -> None:
        self._route[tensor.name].write(tensor, start, data)

    def finish(self) -> int:
        size = sum(writer.finish() for writer in self._writers)
        return size + (self._on_finish() if self._on_finish is not None else 0)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
