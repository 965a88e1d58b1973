"""Write the output's HDF5 structure before any averaged value exists.

The skeleton is a copy of the newest checkpoint's HDF5 file (groups, attributes, every
tensor that is copied rather than averaged) in which each averaged tensor is an allocated
but unwritten contiguous dataset. Its bytes are then filled in one pass, in file order, so
the output is written once and sequentially whatever the format around it. It is needed only
when the output differs in structure from the newest input (--drop-optimizer) or a tensor
cannot be read raw; otherwise the newest input's own bytes serve (`lay_out_output`).
The writers fill the holes with `pwrite_all`; nothing here reads a tensor's value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import h5py
import numpy as np

from wavg.errors import CheckpointError
from wavg.formats.base import Tensor
from wavg.formats.hdf5.reader import Hdf5Checkpoint
from wavg.formats.hdf5.walk import gaps_between


def build_skeleton(
    src: h5py.File,
    dst_path: str,
    tensors: dict[str, Tensor],
    keep: Callable[[str], bool],
    source: str | None = None,
) -> dict[str, int]:
    """Copy `src` into a new HDF5 file at `dst_path`, leaving room for the averaged tensors.

    Objects whose name `keep` rejects (e.g. the optimizer group for --drop-optimizer) are
    left out. Returns the byte offset of each non-empty averaged tensor in the new file.
    HDF5 failures become an `OSError` when writing failed (disk full, file too large) and a
    `CheckpointError` naming `source` when the input could not be read.
    """
    try:
        return _build_skeleton(src, dst_path, tensors, keep)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise _translate(exc, source or str(src.filename)) from None


_WRITE_FAILED = re.compile(r"(write|truncate|extend|flush) failed.*?errno = (\d+)")


def _translate(exc: BaseException, source: str) -> Exception:
    text = " ".join(str(exc).split())
    found = _WRITE_FAILED.search(text)
    if found:
        code = int(found.group(2))
        return OSError(code, os.strerror(code))
    if isinstance(exc, OSError) and exc.errno is not None and not text.startswith("Unable"):
        return exc  # from the operating system, about the output
    return CheckpointError(
        source, f"cannot copy its structure ({text[:200] or type(exc).__name__})"
    )


def _build_skeleton(
    src: h5py.File,
    dst_path: str,
    tensors: dict[str, Tensor],
    keep: Callable[[str], bool],
) -> dict[str, int]:
    _check_types(src)
    averaged = {name for name, t in tensors.items() if t.averaged}
    holds_averaged = {
        name.rsplit("/", i)[0] for name in averaged for i in range(name.count("/") + 1)
    }
    with h5py.File(dst_path, "w", userblock_size=src.userblock_size) as dst:
        copy_attrs(src, dst)
        _copy_group(src, dst, "", averaged, holds_averaged, keep)
        dst.flush()
        offsets = {}
        for name in averaged:
            raw = dst[name].id.get_offset()
            if raw is not None:
                offsets[name] = raw
    return offsets


def _check_types(src: h5py.File) -> None:
    """Refuse variable-length types that libhdf5 decodes but crashes converting.

    libhdf5 accepts a variable-length type whose kind is neither sequence nor string (a
    damaged bit field) and then crashes (SIGSEGV) reading or copying its values.
    """
    objects: list[h5py.HLObject] = [src]
    src.visititems(lambda name, obj: objects.append(obj))
    for obj in objects:
        found = (
            [(f"dataset {obj.name}", obj.id.get_type())] if isinstance(obj, h5py.Dataset) else []
        )
        for name in obj.attrs:
            key = name if isinstance(name, bytes) else name.encode()
            found.append(
                (f"attribute {name!r} of {obj.name}", h5py.h5a.open(obj.id, key).get_type())
            )
        for what, ftype in found:
            # H5Tencode: 2 bytes of header, then the datatype message (class, bit field, ...).
            # Strings report class STRING, so a VLEN here must be a sequence (kind 0).
            if ftype.get_class() == h5py.h5t.VLEN and ftype.encode()[3] & 0x0F != 0:
                raise ValueError(f"{what} has a damaged variable-length type")


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
            create_empty_like(obj, dst, key)
        elif name in holds_averaged:
            sub = dst.create_group(key)
            copy_attrs(obj, sub)
            _copy_group(obj, sub, f"{name}/", averaged, holds_averaged, keep)
        else:
            # H5Ocopy: the whole subtree with its attributes, in C, chunk by chunk.
            src.copy(obj, dst, name=key)


def create_empty_like(src: h5py.Dataset, dst: h5py.Group, key: str) -> None:
    """A contiguous dataset with `src`'s exact type and shape, allocated now, never filled."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    h5py.h5d.create(dst.id, key.encode(), src.id.get_type(), src.id.get_space(), dcpl=dcpl)
    copy_attrs(src, dst[key])


def copy_attrs(src: h5py.HLObject, dst: h5py.HLObject) -> None:
    """Copy attributes with their exact stored types (fixed vs variable strings, arrays)."""
    for name in src.attrs:
        key = name if isinstance(name, bytes) else name.encode()  # bytes: not valid UTF-8
        attr = h5py.h5a.open(src.id, key)
        new = h5py.h5a.create(dst.id, key, attr.get_type(), attr.get_space())
        if attr.get_storage_size() or attr.shape:
            buf = np.empty(attr.shape, dtype=attr.dtype)
            ftype = attr.get_type()
            if ftype.detect_class(h5py.h5t.VLEN) or ftype.detect_class(h5py.h5t.REFERENCE):
                # Sequences and references are not laid out in memory as their file type:
                # reading them with it would overrun `buf`. h5py converts them to objects.
                attr.read(buf)
                new.write(buf)
            else:
                attr.read(buf, mtype=ftype)
                new.write(buf, mtype=ftype)


def lay_out_output(
    template: Hdf5Checkpoint, skeleton_path: str, keep: Callable[[str], bool] | None
) -> tuple[dict[str, int], bool]:
    """Decide where the output's HDF5 bytes come from; return the averaged tensors' offsets
    in them and whether they are the template's own bytes.

    With nothing dropped (`keep` None) and every averaged tensor raw, the output is the
    template's weights file byte for byte outside those tensors (see `weights_bytes`);
    otherwise its structure is rebuilt at `skeleton_path`.
    """
    source = template.weights_bytes() if keep is None else None
    if source is None:
        with template.weights_h5() as src:
            offsets = build_skeleton(
                src, skeleton_path, template.tensors, keep or (lambda name: True), template.path
            )
        return offsets, False
    start, _ = source
    offsets = {n: t.offset - start for n, t in template.tensors.items() if t.averaged and t.size}
    return offsets, True


def copy_around_tensors(template: Hdf5Checkpoint, offsets: dict[str, int], dst_fd: int) -> None:
    """Give `dst_fd` the template's HDF5 bytes except the averaged tensors' (left as holes).

    The copy stays in the kernel (``copy_file_range``) where the platform has it; from
    object storage the gaps are fetched ahead together, not one small read after another.
    """
    start, length = template.weights_bytes()
    tensors = template.tensors
    extents = [(off, off + tensors[name].nbytes) for name, off in offsets.items()]
    gaps = gaps_between(extents, 0, length)
    if template.file.prefetches:
        template.file.will_read([(start + first, last - first) for first, last in gaps])
    os.ftruncate(dst_fd, length)
    for first, last in gaps:
        template.file.copy_range_to(dst_fd, start + first, first, last - first)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (pwrite may write less than asked)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def as_bytes(data: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(data)).cast("B")
