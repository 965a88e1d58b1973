"""The reader and writer interface every checkpoint format offers to the averaging core.

A `Checkpoint` lists its `Tensor`s and reads one block of one tensor, or many whole small
tensors at once (`read_many`); a `Writer` receives averaged blocks in file order inside the
checkpoint's `output`. The averaging core sees only these; nothing here knows a format.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wavg.formats.layouts import Layout
from wavg.storage.atomic import check_output_dir
from wavg.storage.bytesource import InputSource

# A compressed or chunked tensor may declare at most this many times its stored bytes
# (beyond a small floor), in every format: real weights barely compress, a fill-value bomb
# compresses ~1000x.
MAX_EXPANSION = 64
EXPANSION_FLOOR_BYTES = 16 << 20


@functools.cache
def bfloat16() -> np.dtype:
    """numpy's bfloat16 (from ml_dtypes, imported on first use: most models have none, and
    every import is paid at each start-up)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class Tensor:
    """One stored array of a checkpoint, as far as averaging is concerned.

    `dtype` is the numeric type used for arithmetic (bfloat16 for Keras' opaque 2-byte
    storage); `storage` is the type on disk. `offset` is the absolute byte position of the
    data in the checkpoint's byte source when it can be read raw (contiguous, unfiltered),
    else None (the format decodes it).
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    storage: np.dtype
    averaged: bool
    offset: int | None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.storage.itemsize


def iter_blocks(
    shape: tuple[int, ...], itemsize: int, budget: int
) -> Iterator[tuple[int, int, tuple[slice, ...]]]:
    """Split a C-ordered array into hyperslabs of at most `budget` bytes where possible.

    Yields ``(flat_start, count, slices)``; each block is contiguous in memory order, so a
    raw read takes ``count`` items at ``flat_start`` and a decoding one ``slices``. A block
    is larger than the budget only when a single innermost row is.
    """
    if math.prod(shape) == 0:
        return
    if not shape:
        yield 0, 1, ()
        return
    yield from _blocks(shape, itemsize, max(budget, itemsize), 0)


def _blocks(
    shape: tuple[int, ...], itemsize: int, budget: int, flat_start: int
) -> Iterator[tuple[int, int, tuple[slice, ...]]]:
    inner = math.prod(shape[1:])
    if inner * itemsize <= budget or len(shape) == 1:
        rows = max(1, budget // max(1, inner * itemsize))
        for first in range(0, shape[0], rows):
            stop = min(first + rows, shape[0])
            yield flat_start + first * inner, (stop - first) * inner, (slice(first, stop),)
        return
    for index in range(shape[0]):
        for start, count, rest in _blocks(shape[1:], itemsize, budget, flat_start + index * inner):
            yield start, count, (slice(index, index + 1), *rest)


def whole(tensor: Tensor) -> tuple[slice, ...]:
    """The slices of all of `tensor` (one block)."""
    return tuple(slice(0, n) for n in tensor.shape)


def slots(tensors: Sequence[Tensor], out: np.ndarray) -> list[tuple[Tensor, np.ndarray]]:
    """Each tensor with its part of the byte buffer `out`, back to back in the order given;
    `ValueError` when `out` is not exactly their size (see `Checkpoint.read_many`)."""
    found: list[tuple[Tensor, np.ndarray]] = []
    position = 0
    for tensor in tensors:
        found.append((tensor, out[position : position + tensor.nbytes]))
        position += tensor.nbytes
    if position != out.nbytes:
        raise ValueError("read_many: the buffer does not match the tensors' size")
    return found


class Writer:
    """Receives the averaged tensors of one output.

    `order` lists the averaged tensors in the order their bytes lie in the output; the core
    writes them in that order, each block by block, so every format can stream.
    """

    order: list[str]

    def write(self, tensor: Tensor, start: int, data: np.ndarray) -> None:
        """Items ``start … start+len(data)`` of `tensor` (flat, C order, its storage dtype)."""
        raise NotImplementedError

    def finish(self) -> int:
        """Flush everything to disk (fsync) and return the output's size in bytes."""
        raise NotImplementedError

    def close(self) -> None:
        """Release descriptors and scratch files; safe to call after an error."""


class Checkpoint:
    """An open input checkpoint: its layout, its tensors, block reads and its like as output.

    `file` is what the checkpoint was read from (`InputSource`): the core sets its
    `keep_open`, sums its transfer counters and checks it unchanged after the last read.
    """

    def __init__(self, file: InputSource, layout: Layout) -> None:
        self.file = file
        self.path = file.path
        self.layout = layout
        self.tensors: dict[str, Tensor] = {}

    def check_output(self, out: Path) -> None:
        """Raise `OutputError` if `out` cannot hold an output in this format (checked before
        any tensor is read; a file here, a folder for unzipped .keras models)."""
        check_output_dir(out)

    def output(
        self, out: Path, keep: Callable[[str], bool] | None
    ) -> contextlib.AbstractContextManager[Writer]:
        """A writer for a new output at `out` in this checkpoint's format, committed on exit;
        `keep(name)` filters the stored objects (None keeps everything).

        The commit is the format's business, because only the format knows what "one
        output" is: a single file (temp file, fsync, rename, fsync of the directory), an
        index and its shards, a folder, an Orbax root. The contract for every format:
        when the block exits normally, after `Writer.finish`, `out` is the complete new
        output; when it raises, `out` is exactly what it was before and no temporary file
        is left behind (a killed run's leftovers are removed by the next run for `out`).
        `OSError` from creating the writer propagates; the caller names the output.
        """
        raise NotImplementedError

    def blocks(self, tensor: Tensor, budget: int) -> Iterator[tuple[int, int, tuple[slice, ...]]]:
        """The blocks `tensor` is averaged in: ``(flat_start, count, slices)``, in write order.

        Here contiguous runs of at most `budget` items; a format whose reads decode whole
        chunks yields its chunks instead (then memory is bounded by the largest chunk).
        """
        return iter_blocks(tensor.shape, 1, budget)

    def check_matches(self, newest: Checkpoint) -> None:
        """Refuse to average this checkpoint with `newest` beyond what its tensors show
        (tensor names, shapes and dtypes are compared by the caller)."""

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

    def read(
        self, tensor: Tensor, start: int, count: int, slices: tuple[slice, ...], scratch: np.ndarray
    ) -> np.ndarray:
        """Items ``start … start+count`` of `tensor` (flat, C order) in its numeric dtype.

        `tensor` is this checkpoint's own description; `slices` is the same block as a
        hyperslab (from `blocks`). The result may be a view of `scratch` (a byte buffer
        reused between calls), so it is only valid until the next read. Thread-safe: the
        core's workers read one checkpoint at once. Problems are `CheckpointError`s.
        """
        raise NotImplementedError

    def read_many(self, tensors: Sequence[Tensor], out: np.ndarray) -> None:
        """Fill the byte buffer `out` with the stored bytes of the whole `tensors` (this
        checkpoint's own descriptions), back to back in the order given.

        This lets the core average hundreds of small tensors as one array. Here one `read`
        per tensor; a format that can batch them (one vectored read) does so instead.
        """
        for tensor, slot in slots(tensors, out):
            data = self.read(tensor, 0, tensor.size, whole(tensor), slot)
            slot[:] = data.reshape(-1).view(np.uint8)

    def will_read(self, names: list[str], readers: int = 1) -> None:
        """A hint: these tensors will be read, in this order, with `readers` inputs read in
        lockstep (a format may tell its byte source to fetch ahead). Here nothing."""

    def trim(self) -> None:
        """Give back what reads do not need once the checkpoint is open (a decoder's
        handle and caches); reopened on demand. Here nothing."""

    def release(self) -> None:
        """Give back descriptors; the next read reopens (and re-identifies) the input."""
        self.file.release()

    def close(self) -> None:
        """Release for good: nothing is kept open from now on."""
        self.file.keep_open = False
        self.release()
