"""The reader and writer interface every checkpoint format offers to the averaging core.

A `Checkpoint` lists its tensors and reads one block of one tensor, or many whole small
tensors at once (`read_many`); a `Writer` receives averaged blocks in file order. `combine.py` sees only these two, never a format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from wavg.errors import CheckpointError
from wavg.formats.hdf5.walk import (
    Tensor,
    check_global_heaps,
    confirm_opaque_types,
    gaps_between,
    iter_blocks,
    open_h5,
    read_hyperslab,
    walk,
)
from wavg.formats.layouts import Layout
from wavg.storage.atomic import atomic_output, check_output_dir
from wavg.storage.local import InputFile


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
        # Where the HDF5 weights file lies in the input (start, end), once its tensors are
        # known; and its bytes outside the raw tensors, kept once another input asks.
        self._span: tuple[int, int] | None = None
        self._metadata: list[tuple[int, int, list[tuple[int, bytes]]]] | None = None

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
        self._span = (base_offset, data_end)
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

    def _predict_from(self, like: Checkpoint | None, base_offset: int, data_end: int) -> bool:
        """Take `like`'s layout and tensors if this input's HDF5 file is `like`'s byte for
        byte outside `like`'s raw tensors; False (nothing changed) when it is not.

        Checkpoints of one run share their HDF5 structure: only the tensors' values differ.
        Every check the walk makes (links, object types, layouts, filters, offsets, sizes,
        global heaps, attributes) reads only bytes outside the raw tensors, so bytes equal
        there, in a file of equal length, pass the same checks with the same result: the
        validation of `like` is this file's, verified by one comparison instead of
        rediscovered through libhdf5 (~20 ms per file of a few hundred tensors). Every
        averaged tensor is read raw (else no prediction). When libhdf5 does open this file
        later (the newest's config attribute, a tensor copied through h5py, a rebuilt
        skeleton), what it parses is the structure the walk of `like` validated.
        """
        if (
            like is None
            or type(like) is not type(self)
            or like._span is None
            or not like.raw_readable
            or like._span[1] - like._span[0] != data_end - base_offset
        ):
            return False
        metadata = like._metadata_bytes()
        if metadata is None:
            return False
        for start, length, parts in metadata:
            data = memoryview(self.file.read_at(base_offset + start, length))
            if any(data[at : at + len(expected)] != expected for at, expected in parts):
                return False
        shift = base_offset - like._span[0]
        self.layout = like.layout
        if shift == 0:  # (a copy: the newest's may be re-flagged, see `mark_written`)
            self.tensors = dict(like.tensors)
        else:
            self.tensors = {
                name: t if t.offset is None else dataclasses.replace(t, offset=t.offset + shift)
                for name, t in like.tensors.items()
            }
        self._span = (base_offset, data_end)
        return True

    def _metadata_bytes(self) -> list[tuple[int, int, list[tuple[int, bytes]]]] | None:
        """This HDF5 file's bytes outside its raw tensors, kept to compare other inputs with;
        None when they are too many to keep (chunked tensors' data).

        As reads: ``(start, length, [(offset in the read, bytes), ...])`` with `start` from
        the HDF5 file's start; one read spans the gaps around tensors of at most
        `MAX_READ_GAP` bytes (hundreds of small tensors: a few reads, not one per gap).
        """
        if self._metadata is None and self._span is not None:
            start, end = self._span
            extents = [
                (t.offset, t.offset + t.nbytes)
                for t in self.tensors.values()
                if t.offset is not None
            ]
            gaps = gaps_between(extents, start, end)
            if sum(last - first for first, last in gaps) > MAX_PREDICTED_METADATA:
                return None
            runs: list[tuple[int, int, list[tuple[int, int]]]] = []
            for first, last in gaps:
                if runs and first - runs[-1][1] <= MAX_READ_GAP:
                    runs[-1] = (runs[-1][0], last, runs[-1][2])
                else:
                    runs.append((first, last, []))
                runs[-1][2].append((first, last))
            metadata = []
            for first, last, parts in runs:
                data = self.file.read_at(first, last - first)
                kept = [(a - first, data[a - first : b - first]) for a, b in parts]
                metadata.append((first - start, last - first, kept))
            self._metadata = metadata
        return self._metadata

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

    def training_config(self) -> Any:
        """The stored training config as parsed JSON (the loss, metrics and optimizer
        ``compile=True`` deserializes; whatever it holds, so a check sees all of it) where the
        format keeps it apart from the model config (legacy ``.h5``), else None. Read as data
        only, never deserialized."""
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

        `tensor` is this checkpoint's own description; `slices` is the same block as a
        hyperslab (from `iter_blocks`). Raw tensors are read into `scratch` (a byte buffer
        reused between calls), so the result is only valid until the next read.
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
            out = self._read_h5(tensor, slices)
        return out.view(tensor.dtype)

    def read_many(self, tensors: Sequence[Tensor], out: np.ndarray) -> None:
        """Fill the byte buffer `out` with the stored bytes of the whole `tensors` (this
        checkpoint's own descriptions), back to back in the order given.

        This lets the core average hundreds of small tensors as one array. Raw tensors lying
        close together in the file are read with one vectored read each run (the bytes
        between them, HDF5 headers, land in scratch); the others through h5py. A format
        that overrides `read` (its bytes live elsewhere) gets, unless it overrides this
        too, one `read` per tensor.
        """
        slots: list[tuple[Tensor, np.ndarray]] = []
        position = 0
        for tensor in tensors:
            slots.append((tensor, out[position : position + tensor.nbytes]))
            position += tensor.nbytes
        if position != out.nbytes:
            raise ValueError("read_many: the buffer does not match the tensors' size")
        if type(self).read is not Checkpoint.read:
            for tensor, slot in slots:
                data = self.read(tensor, 0, tensor.size, _whole(tensor), slot)
                slot[:] = data.reshape(-1).view(np.uint8)
            return
        raw = sorted((s for s in slots if s[0].offset is not None), key=lambda s: s[0].offset)
        for tensor, slot in slots:
            if tensor.offset is None:
                slot[:] = self._read_h5(tensor, _whole(tensor)).view(np.uint8)
        for start, buffers in _vectored_runs(raw):
            self._readv(start, buffers)

    def _readv(self, offset: int, buffers: list[np.ndarray]) -> None:
        """Consecutive bytes at `offset` into `buffers` (the byte source's vectored read)."""
        try:
            got = self.file.readv(offset, buffers)
        except OSError as exc:
            raise CheckpointError(self.path, f"read error ({exc.strerror})") from None
        if got != sum(b.nbytes for b in buffers):
            raise CheckpointError(self.path, "truncated while reading tensors")

    def _read_h5(self, tensor: Tensor, slices: tuple[slice, ...]) -> np.ndarray:
        with self._h5_lock, self.weights_h5() as h5:  # h5py handles are not shared
            return read_hyperslab(h5[tensor.name], slices, self.path)

    def will_read(self, names: list[str], readers: int = 1) -> None:
        """Tell the byte source which tensors' raw bytes will be read, in this order, with
        `readers` inputs read in lockstep (it may fetch ahead; a local file ignores this)."""
        tensors = [self.tensors[n] for n in names if n in self.tensors]
        ranges: list[tuple[int, int]] = []
        for t in tensors:
            if t.offset is not None:
                ranges.append((t.offset, t.nbytes))
            elif t.size and getattr(self.file, "prefetches", False):
                ranges.extend(self._chunk_ranges(t))
        self.file.will_read(ranges, readers)

    def _hdf5_base(self) -> int | None:
        """Where byte 0 of the HDF5 weights file lies in the byte source, or None when h5py
        reads it through a decoder (its addresses are then no ranges of the source)."""
        return 0

    def _chunk_ranges(self, tensor: Tensor) -> list[tuple[int, int]]:
        """``(offset, size)`` of a chunked tensor's stored chunks, in index order: h5py reads
        them one by one, so a remote source can fetch them ahead, coalesced and concurrently,
        instead of one request at a time. Empty when unknown (a hint, never a promise)."""
        base = self._hdf5_base()
        if base is None:
            return []
        with self._h5_lock, self.weights_h5() as h5:
            dsid = h5[tensor.name].id
            try:
                count = dsid.get_num_chunks()
                if count > MAX_PLANNED_CHUNKS:
                    return []
                infos = [dsid.get_chunk_info(i) for i in range(count)]
            except (AttributeError, OSError, RuntimeError, ValueError, TypeError):
                return []  # not chunked (compact), or an HDF5 without chunk queries
        return [(base + i.byte_offset, i.size) for i in infos if i.byte_offset is not None]

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


# At most this many bytes of HDF5 structure are kept to compare other inputs with (see
# `Checkpoint._predict_from`); Keras checkpoints hold well under 1 MB of it.
MAX_PREDICTED_METADATA = 16 << 20
# A chunked tensor of more chunks than this is read without planning them ahead (listing
# them costs one libhdf5 query each).
MAX_PLANNED_CHUNKS = 100_000
# Bytes between two raw tensors that one vectored read reads and discards rather than
# splitting into two reads (Keras puts each dataset's header, a few hundred bytes, between).
MAX_READ_GAP = 64 << 10


def _whole(tensor: Tensor) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in tensor.shape)


def _vectored_runs(
    raw: list[tuple[Tensor, np.ndarray]],
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Group raw tensors sorted by offset into ``(file offset, buffers)`` vectored reads:
    each tensor's slot, with a scratch buffer for each gap of at most `MAX_READ_GAP`."""
    gaps: list[int] = []
    runs: list[tuple[int, list]] = []
    end = -1
    for tensor, slot in raw:
        gap = tensor.offset - end
        if runs and 0 <= gap <= MAX_READ_GAP:
            if gap:
                runs[-1][1].append(gap)
                gaps.append(gap)
        else:
            runs.append((tensor.offset, []))
        runs[-1][1].append(slot)
        end = tensor.offset + tensor.nbytes
    if not runs:
        return
    discard = np.empty(max(gaps, default=0), np.uint8)
    for start, parts in runs:
        yield start, [discard[:p] if isinstance(p, int) else p for p in parts]


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
