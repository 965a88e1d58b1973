"""The HDF5 layer shared by every format: walk a weights file safely, read and write tensors.

Keras keeps weights in HDF5 in all three formats (legacy ``.h5``, ``.weights.h5`` and the
``model.weights.h5`` inside a ``.keras`` archive); they differ only in where the tensors sit
and where the optimizer state sits. This module knows HDF5, not Keras.

Reading: most tensors Keras writes are contiguous and unfiltered, so their bytes are read
with ``os.preadv`` straight into a numpy buffer (no HDF5 call per chunk, the GIL released,
no copy). Anything else (chunked, compressed, compact) is read through h5py by hyperslab.

Safety: the walk refuses anything that would make a read leave the file (external links,
soft links, virtual datasets, external raw storage), objects linked twice (cycles), data
that lies past the end of the file, and declared sizes that dwarf the stored bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import h5py
import ml_dtypes
import numpy as np

from wavg.errors import CheckpointError, UnsafeCheckpoint

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# A chunked or compressed dataset may declare at most this many times its stored bytes
# (beyond a small floor): real weights barely compress, a fill-value bomb compresses ~1000x.
MAX_EXPANSION = 64
EXPANSION_FLOOR_BYTES = 16 << 20


@dataclass(frozen=True)
class Tensor:
    """One dataset of a weights file, as far as averaging is concerned.

    `dtype` is the numeric type used for arithmetic (bfloat16 for Keras' opaque 2-byte
    storage); `storage` is the type on disk. `offset` is the absolute byte position of the
    data in the physical file when it can be read raw (contiguous, unfiltered), else None.
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


def numeric_dtype(dset: h5py.Dataset) -> np.dtype | None:
    """The floating type to average `dset` in, or None when it is not a float weight."""
    dtype = dset.dtype
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        return dtype
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None:
        # Keras stores bfloat16 as opaque 2-byte data; .weights.h5 adds attrs dtype=bfloat16,
        # legacy .h5 does not. No other 2-byte opaque type appears in Keras checkpoints.
        marker = dset.attrs.get("dtype")
        if marker is None or _text(marker) == "bfloat16":
            return BFLOAT16
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def walk(
    h5: h5py.File,
    path: str,
    is_averaged: Callable[[str], bool],
    base_offset: int,
    data_end: int,
) -> dict[str, Tensor]:
    """Check every object of `h5` and return its datasets by name, in file order.

    `is_averaged(name)` says whether a float dataset is a model weight (as opposed to
    optimizer state); `base_offset` is where the HDF5 data starts in the physical file and
    `data_end` where it must end. Raises `UnsafeCheckpoint` or `CheckpointError` naming
    `path` and the object.
    """
    tensors: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()

    def visit(group: h5py.Group, prefix: str) -> None:
        for key in group:
            name = f"{prefix}{key}"
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise UnsafeCheckpoint(path, f"{name} is an external link to {link.filename}")
            if not isinstance(link, h5py.HardLink):
                raise UnsafeCheckpoint(path, f"{name} is a soft link; checkpoints must be plain")
            obj = group[key]
            info = h5py.h5o.get_info(obj.id)
            ident = (info.fileno, info.addr)
            if ident in seen:
                raise UnsafeCheckpoint(path, f"{name} links to an object seen before (a cycle)")
            seen.add(ident)
            if isinstance(obj, h5py.Group):
                visit(obj, f"{name}/")
            elif isinstance(obj, h5py.Dataset):
                tensors[name] = _tensor(path, name, obj, is_averaged, base_offset, data_end)
            else:
                raise UnsafeCheckpoint(path, f"{name} is a named datatype, not a tensor")

    try:
        visit(h5, "")
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(path, f"damaged HDF5 structure ({_reason(exc)})") from None
    return tensors


def _tensor(
    path: str,
    name: str,
    dset: h5py.Dataset,
    is_averaged: Callable[[str], bool],
    base_offset: int,
    data_end: int,
) -> Tensor:
    if dset.is_virtual:
        raise UnsafeCheckpoint(path, f"{name} is a virtual dataset (reads other files)")
    if dset.external:
        raise UnsafeCheckpoint(path, f"{name} keeps its data in external files")
    if dset.shape is None:
        shape: tuple[int, ...] = ()
        declared = 0
    else:
        shape = tuple(int(n) for n in dset.shape)
        declared = math.prod(shape) * dset.dtype.itemsize
    dcpl = dset.id.get_create_plist()
    stored = dset.id.get_storage_size()
    layout = dcpl.get_layout()
    offset = None
    if layout == h5py.h5d.CONTIGUOUS and dcpl.get_nfilters() == 0 and declared > 0:
        raw = dset.id.get_offset()
        if raw is None:
            raise CheckpointError(path, f"tensor {name} has no stored data")
        offset = base_offset + raw
        if offset + declared > data_end:
            raise CheckpointError(path, f"truncated: tensor {name} runs past the end of the file")
    elif declared > EXPANSION_FLOOR_BYTES and declared > MAX_EXPANSION * stored:
        raise UnsafeCheckpoint(
            path,
            f"tensor {name} declares {declared} bytes but stores only {stored}; "
            "refusing a decompression bomb",
        )
    dtype = numeric_dtype(dset) if dset.shape is not None else None
    averaged = dtype is not None and is_averaged(name)
    return Tensor(name, shape, dtype or dset.dtype, dset.dtype, averaged, offset)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def iter_blocks(
    shape: tuple[int, ...], itemsize: int, budget: int
) -> Iterator[tuple[int, int, tuple[slice, ...]]]:
    """Split a C-ordered array into hyperslabs of at most `budget` bytes where possible.

    Yields ``(flat_start, count, slices)``; each block is contiguous in memory order, so the
    raw path reads ``count`` items at ``flat_start`` and the h5py path reads ``slices``. A
    block is larger than the budget only when a single innermost row is.
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


def read_raw(fd: int, offset: int, out: np.ndarray, path: str, name: str) -> None:
    """Fill `out` with the bytes at `offset` of `fd`; a short file is a truncation error."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CheckpointError(path, f"truncated while reading tensor {name}")
        done += got


def read_hyperslab(dset: h5py.Dataset, slices: tuple[slice, ...], path: str) -> np.ndarray:
    """Read one block through h5py, mapping HDF5's errors to a `CheckpointError`."""
    try:
        return np.asarray(dset[slices] if slices else dset[()]).reshape(-1)
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(path, f"cannot read {dset.name} ({_reason(exc)})") from None


def open_h5(source: str | IO[bytes], path: str) -> h5py.File:
    """Open an HDF5 file read-only, with a `CheckpointError` for anything h5py rejects."""
    try:
        # locking=False: a checkpoint that a training job still has open must not block us
        # (we detect a file that changes under us separately), and read-only media work.
        return h5py.File(source, "r", locking=False)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(path, f"not a readable HDF5 file ({_reason(exc)})") from None
