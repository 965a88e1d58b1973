"""`Hdf5Checkpoint`: the reading state every checkpoint whose weights are one HDF5 file shares.

Legacy ``.h5``, ``.weights.h5`` and the weights member of a ``.keras`` archive differ only in
where the HDF5 bytes lie in their byte source; this class walks them once (or proves them
equal to another input's, see `_predict_from`), reads raw tensors straight from the source
and the others through h5py. It reads through a `ByteSource` only and never writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from wavg.errors import CheckpointError
from wavg.formats.base import Checkpoint, Tensor, Writer, slots, whole
from wavg.formats.hdf5.prefetch import prefetch_structure
from wavg.formats.hdf5.walk import (
    check_global_heaps,
    confirm_opaque_types,
    gaps_between,
    open_h5,
    read_hyperslab,
    walk,
)
from wavg.formats.layouts import Layout
from wavg.storage.atomic import atomic_output
from wavg.storage.bytesource import ByteSource

# At most this many bytes of HDF5 structure are kept to compare other inputs with (see
# `Hdf5Checkpoint._predict_from`); Keras checkpoints hold well under 1 MB of it.
MAX_PREDICTED_METADATA = 16 << 20
# A chunked tensor of more chunks than this is read without planning them ahead (listing
# them costs one libhdf5 query each).
MAX_PLANNED_CHUNKS = 100_000
# Bytes between two raw tensors that one vectored read reads and discards rather than
# splitting into two reads (Keras puts each dataset's header, a few hundred bytes, between).
MAX_READ_GAP = 64 << 10


class Hdf5Checkpoint(Checkpoint):
    """A checkpoint read from one HDF5 weights file inside one byte source.

    Subclasses say where the HDF5 file lies (`_open_weights`, `_hdf5_base`), call
    `_load_tensors` or `_predict_from` once, and make the output's writer (`make_writer`).
    """

    file: ByteSource

    def __init__(self, file: ByteSource, layout: Layout) -> None:
        super().__init__(file, layout)
        self._h5: h5py.File | None = None
        self._h5_lock = threading.Lock()
        # Where the HDF5 weights file lies in the input (start, end), once its tensors are
        # known; and its bytes outside the raw tensors, kept once another input asks.
        self._span: tuple[int, int] | None = None
        self._metadata: list[tuple[int, int, list[tuple[int, bytes]]]] | None = None
        self._metadata_lock = threading.Lock()  # other inputs, opened at once, ask together

    def _open_weights(self) -> h5py.File:
        """The weights file through h5py (subclasses know where it lies)."""
        raise NotImplementedError

    def make_writer(self, tmp_path: str, keep: Callable[[str], bool] | None) -> Writer:
        """A writer for an output like this checkpoint at `tmp_path`; `keep(name)` filters
        its objects (None keeps everything, which lets the writer copy this file's bytes)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def output(self, out: Path, keep: Callable[[str], bool] | None) -> Iterator[Writer]:
        """One file: written at a temporary path, fsynced and renamed over `out` on exit."""
        with atomic_output(out) as tmp:
            writer = self.make_writer(tmp, keep)
            try:
                yield writer
            finally:
                writer.close()

    def _weights_reader(self) -> Callable[[int, int], bytes]:
        """Reads bytes of the HDF5 weights file at physical offsets (see `_load_tensors`)."""
        return self.file.read_at

    def _load_tensors(self, base_offset: int, data_end: int, in_file: bool = True) -> None:
        """Walk and check the HDF5 file at ``base_offset … data_end`` of the input; `in_file`:
        it lies there byte for byte (not behind a decompressing stream), so its structure can
        be fetched ahead of the walk from storage that costs a round trip per read."""
        self._span = (base_offset, data_end)
        if in_file and self.file.prefetches:
            prefetch_structure(self.file, base_offset, data_end)
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
            not isinstance(like, Hdf5Checkpoint)
            or type(like) is not type(self)
            or like._span is None
            or not like.raw_readable
            or like._span[1] - like._span[0] != data_end - base_offset
        ):
            return False
        metadata = like._metadata_bytes()
        if metadata is None:
            return False
        if self.file.prefetches:  # one round trip for every run at once, not one each
            self.file.will_read([(base_offset + start, length) for start, length, _ in metadata])
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
        with self._metadata_lock:
            if self._metadata is None and self._span is not None:
                self._metadata = self._read_metadata(*self._span)
        return self._metadata

    def _read_metadata(self, start: int, end: int) -> list | None:
        extents = [
            (t.offset, t.offset + t.nbytes) for t in self.tensors.values() if t.offset is not None
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
        if self.file.prefetches:  # all runs in one round trip
            self.file.will_read([(first, last - first) for first, last, _ in runs])
        metadata = []
        for first, last, parts in runs:
            data = self.file.read_at(first, last - first)
            kept = [(a - first, data[a - first : b - first]) for a, b in parts]
            metadata.append((first - start, last - first, kept))
        return metadata

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
        """Raw tensors are read straight from the byte source into `scratch`; the others
        through h5py by hyperslab."""
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
        """Raw tensors lying close together in the file are read with one vectored read
        each run (the bytes between them, HDF5 headers, land in scratch); the others
        through h5py."""
        self.read_slots(slots(tensors, out))

    def read_slots(self, targets: list[tuple[Tensor, np.ndarray]]) -> None:
        """`read_many` for tensors of this checkpoint paired with their byte buffers."""
        raw = sorted((s for s in targets if s[0].offset is not None), key=lambda s: s[0].offset)
        for tensor, slot in targets:
            if tensor.offset is None:
                slot[:] = self._read_h5(tensor, whole(tensor)).view(np.uint8)
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
        """Tell the byte source which tensors' raw bytes will be read, in this order (and,
        when it fetches ahead, the stored chunks of the others)."""
        tensors = [self.tensors[n] for n in names if n in self.tensors]
        ranges: list[tuple[int, int]] = []
        plan_chunks = self.file.prefetches
        for t in tensors:
            if t.offset is not None:
                ranges.append((t.offset, t.nbytes))
            elif t.size and plan_chunks:
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
        self._close_h5()
        self.file.release()

    def _close_h5(self) -> None:
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
            self._h5 = None


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


def open_hdf5(file: ByteSource) -> h5py.File:
    """h5py over a whole input, the way its byte source says (a local path, or a file
    object over its reads)."""
    return open_h5(file.h5py_source(), file.path)
