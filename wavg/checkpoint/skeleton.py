"""Write the output's HDF5 structure before any averaged value exists.

The skeleton is a copy of the newest checkpoint's HDF5 file (groups, attributes, every
tensor that is copied rather than averaged) in which each averaged tensor is an allocated
but unwritten contiguous dataset. Its bytes are then filled in one pass, in file order, so
the output is written once and sequentially whatever the format around it.
"""

from __future__ import annotations

from collections.abc import Callable

import h5py
import numpy as np

from wavg.checkpoint.hdf5 import Tensor


def build_skeleton(
    src: h5py.File,
    dst_path: str,
    tensors: dict[str, Tensor],
    keep: Callable[[str], bool],
) -> dict[str, int]:
    """Copy `src` into a new HDF5 file at `dst_path`, leaving room for the averaged tensors.

    Objects whose name `keep` rejects (e.g. the optimizer group for --drop-optimizer) are
    left out. Returns the byte offset of each non-empty averaged tensor in the new file.
    """
    averaged = {name for name, t in tensors.items() if t.averaged}
    holds_averaged = {
        name.rsplit("/", i)[0] for name in averaged for i in range(name.count("/") + 1)
    }
    with h5py.File(dst_path, "w", userblock_size=src.userblock_size) as dst:
        _copy_attrs(src, dst)
        _copy_group(src, dst, "", averaged, holds_averaged, keep)
        dst.flush()
        offsets = {}
        for name in averaged:
            raw = dst[name].id.get_offset()
            if raw is not None:
                offsets[name] = raw
    return offsets


def _copy_group(
    src: h5py.Group,
    dst: h5py.Group,
    prefix: str,
    averaged: set[str],
    holds_averaged: set[str],
    keep: Callable[[str], bool],
) -> None:
    for key in src:
        name = f"{prefix}{key}"
        if not keep(name):
            continue
        obj = src[key]
        if name in averaged:
            _create_empty_like(obj, dst, key)
        elif name in holds_averaged:
            sub = dst.create_group(key)
            _copy_attrs(obj, sub)
            _copy_group(obj, sub, f"{name}/", averaged, holds_averaged, keep)
        else:
            # H5Ocopy: the whole subtree with its attributes, in C, chunk by chunk.
            src.copy(obj, dst, name=key)


def _create_empty_like(src: h5py.Dataset, dst: h5py.Group, key: str) -> None:
    """A contiguous dataset with `src`'s exact type and shape, allocated now, never filled."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    h5py.h5d.create(dst.id, key.encode(), src.id.get_type(), src.id.get_space(), dcpl=dcpl)
    _copy_attrs(src, dst[key])


def _copy_attrs(src: h5py.HLObject, dst: h5py.HLObject) -> None:
    """Copy attributes with their exact stored types (fixed vs variable strings, arrays)."""
    for name in src.attrs:
        attr = h5py.h5a.open(src.id, name.encode())
        new = h5py.h5a.create(dst.id, name.encode(), attr.get_type(), attr.get_space())
        if attr.get_storage_size() or attr.shape:
            buf = np.empty(attr.shape, dtype=attr.dtype)
            attr.read(buf, mtype=attr.get_type())
            new.write(buf, mtype=attr.get_type())
