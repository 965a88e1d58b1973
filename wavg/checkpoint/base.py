"""The reader and writer interface every checkpoint format offers to the averaging core.

A `Checkpoint` lists its tensors and reads one block of one tensor at a time; a `Writer`
receives averaged blocks in file order. `combine.py` sees only these two, never a format.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from wavg.atomic import atomic_output, check_output_dir
from wavg.checkpoint.hdf5 import (
    Tensor,
    check_global_heaps,
    confirm_opaque_types,
    iter_blocks,
    open_h5,
    read_hyperslab,
    walk,
)
from wavg.checkpoint.inputfile import InputFile
from wavg.checkpoint.layouts import Layout
from wavg.errors import CheckpointError


class InputSource(Protocol):
    """Where a checkpoint's bytes live: one file (`InputFile`) or a directory of them."""

    path: str
    keep_open: bool
    bytes_fetched: int  # from object storage
    requests: int

    def check_unchanged(self) -> None: ...

    def release(self) -> None: ...


class Writer:
    """Receives the averaged tensors of one output file.

    `order` lists the averaged tensors in the order their bytes lie in the output; the core
    writes them in that order, each block by block, so every format can stream.
    """

    order: list[str]

    def write(self, tensor: Tensor, start: int, data: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> int:
        """Flush everything to disk (fsync) and return the output's size in bytes."""
        raise NotImplementedError

    def close(self) -> None:
        """Release descriptors and scratch files; safe to call after an error."""


class Checkpoint:
    """An open input checkpoint: its layout, its tensors, and block reads."""

    # Whether an output in this format can be staged locally and uploaded file by file.
    output_to_url = True

    def __init__(self, file: InputSource, layout: Layout) -> None:
        self.file = file
        self.path = file.path
        self.layout = layout
        self.tensors: dict[str, Tensor] = {}
        self._h5: h5py.File | None = None
        self._h5_lock = threading.Lock()

    # Subclasses say where the HDF5 data lives.
    def _open_weights(self) -> h5py.File:
        raise NotImplementedError

    def make_writer(self, tmp_path: str, keep: Callable[[str], bool] | None) -> Writer:
        """A writer for an output like this checkpoint; `keep(name)` filters its objects
        (None keeps everything, which lets the writer copy this file's bytes as they are)."""
        raise NotImplementedError

    def check_output(self, out: Path) -> None:
        """Raise `OutputError` if `out` cannot hold an output in this format (checked before
        any tensor is read; a file here, a folder for unzipped .keras models)."""
        check_output_dir(out)

    @contextlib.contextmanager
    def output(self, out: Path, keep: Callable[[str], bool] | None) -> Iterator[Writer]:
        """A writer for a new output at `out` in this checkpoint's format, committed on exit.

        The commit is the format's business, because only the format knows what "one
        output" is: a single file here (temp file, fsync, rename, fsync of the directory);
        an index and its shards, or a folder, elsewhere. The contract for every format:
        when the block exits normally, after `Writer.finish`, `out` is the complete new
        output; when it raises, `out` is exactly what it was before and no temporary file
        is left behind (a killed run's leftovers are removed by the next run for `out`).
        `OSError` from creating the writer propagates; the caller names the output.
        """
        with atomic_output(out) as tmp:
            writer = self.make_writer(tmp, keep)
            try:
                yield writer
            finally:
                writer.close()

    def blocks(self, tensor: Tensor, budget: int) -> Iterator[tuple[int, int, tuple[slice, ...]]]:
        """The blocks `tensor` is averaged in: ``(flat_start, count, slices)``, in write order.

        Here contiguous runs of at most `budget` items; a format whose reads decode whole
        chunks yields its chunks instead (then memory is bounded by the largest chunk).
        """
        return iter_blocks(tensor.shape, 1, budget)

    def check_matches(self, newest: Checkpoint) -> None:
        """Refuse to average this checkpoint with `newest` beyond what its tensors show
        (tensor names, shapes and dtypes are compared by the caller)."""

    def _weights_reader(self) -> Callable[[int, int], bytes]:
        """Reads bytes of the HDF5 weights file at physical offsets (see `_load_tensors`)."""
        return self.file.read_at

    def _load_tensors(self, base_offset: int, data_end: int) -> None:
        with self.weights_h5() as h5:
            tensors = walk(
                h5, self.path, lambda n: not self.layout.is_optimizer(n), base_offset, data_end
            )
            extents = [
                (t.offset, t.offset + t.nbytes) for t in tensors.values() if t.offset is not None
            ]
            sizeof_size = h5.id.get_create_plist().get_sizes()[1]
            check_global_heaps(
                extents, self._weights_reader(), sizeof_size, self.path, base_offset, data_end
            )
            confirm_opaque_types(h5, tensors)
            self.tensors = tensors

    @contextlib.contextmanager
    def weights_h5(self) -> Iterator[h5py.File]:
        """The weights file through h5py, reopened if it was released."""
        if self._h5 is None:
            self._h5 = self._open_weights()
        try:
            yield self._h5
        finally:
            if not self.file.keep_open:
                self._close_h5()

    def model_config(self) -> dict | None:
        """The stored model config as parsed JSON, or None when the format keeps none
        (``.weights.h5``) or it is unreadable. Read as data only, never deserialized."""
        return None

    def weights_bytes(self) -> tuple[int, int] | None:
        """``(start, length)`` of the HDF5 weights file inside this input when its bytes can
        serve as the output's as they are (every averaged tensor is raw), else None."""
        return None

    @property
    def raw_readable(self) -> bool:
        return all(t.offset is not None for t in self.tensors.values() if t.averaged and t.size)

    def read(
        self, tensor: Tensor, start: int, count: int, slices: tuple[slice, ...], scratch: np.ndarray
    ) -> np.ndarray:
        """Items ``start … start+count`` of `tensor` (flat, C order) in its numeric dtype.

        Raw tensors are read into `scratch` (a byte buffer reused between calls), so the
        result is only valid until the next read.
        """
        if tensor.offset is not None:
            out = scratch[: count * tensor.storage.itemsize].view(tensor.storage)
            view = memoryview(out).cast("B")
            try:
                got = self.file.readinto(tensor.offset + start * tensor.storage.itemsize, view)
            except OSError as exc:
                raise CheckpointError(
                    self.path, f"read error in {tensor.name} ({exc.strerror})"
                ) from None
            if got != len(view):
                raise CheckpointError(self.path, f"truncated while reading tensor {tensor.name}")
        else:
            with self._h5_lock, self.weights_h5() as h5:  # h5py handles are not shared
                out = read_hyperslab(h5[tensor.name], slices, self.path)
        return out.view(tensor.dtype)

    def will_read(self, names: list[str], readers: int = 1) -> None:
        """Tell the byte source which tensors' raw bytes will be read, in this order, with
        `readers` inputs read in lockstep (it may fetch ahead; a local file ignores this)."""
        tensors = [self.tensors[n] for n in names if n in self.tensors]
        ranges = [(t.offset, t.nbytes) for t in tensors if t.offset is not None]
        self.file.will_read(ranges, readers)

    def trim(self) -> None:
        """Close the h5py handle if raw reads need none (its metadata cache costs memory
        per input); it is reopened on demand."""
        if self.raw_readable:
            with self._h5_lock:
                self._close_h5()

    def release(self) -> None:
        """Give back descriptors; the next read reopens (and re-identifies) the file."""
        self._close_h5()
        self.file.release()

    def _close_h5(self) -> None:
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
            self._h5 = None

    def close(self) -> None:
        self.file.keep_open = False
        self.release()


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (pwrite may write less than asked)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def as_bytes(data: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(data)).cast("B")


def open_hdf5(file: InputFile) -> h5py.File:
    """h5py over a whole input, the way its byte source says (a local path, or a file
    object over its reads)."""
    return open_h5(file.h5py_source(), file.path)
