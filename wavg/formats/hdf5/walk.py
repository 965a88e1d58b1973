"""The HDF5 layer shared by every format: walk a weights file safely, read and write tensors.

Keras keeps weights in HDF5 in all three formats (legacy ``.h5``, ``.weights.h5`` and the
``model.weights.h5`` inside a ``.keras`` archive); they differ only in where the tensors sit
and where the optimizer state sits. This module knows HDF5, not Keras.

Reading: most tensors Keras writes are contiguous and unfiltered, so their bytes are read
raw (the byte source's ``readinto``/``readv``) straight into a numpy buffer (no HDF5 call per
chunk, the GIL released, no copy). Anything else (chunked, compressed, compact) is read through h5py by hyperslab.

Safety: the walk refuses anything that would make a read leave the file (external links,
soft links, virtual datasets, external raw storage), objects linked twice (cycles), data
that lies past the end of the file, and declared sizes that dwarf the stored bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import IO, Any

import h5py
import numpy as np

from wavg.errors import CheckpointError, UnsafeCheckpoint
from wavg.formats.base import EXPANSION_FLOOR_BYTES, MAX_EXPANSION, Tensor, bfloat16

IEEE_FLOATS = tuple(
    getattr(h5py.h5t, f"IEEE_F{bits}{order}") for bits in (16, 32, 64) for order in ("LE", "BE")
)


def numeric_dtype(dtype: np.dtype) -> np.dtype | None:
    """The floating type to average a dataset of `dtype` in, or None when it is no float.

    Keras stores bfloat16 as opaque 2-byte data (.weights.h5 adds an attribute
    dtype=bfloat16, legacy .h5 does not); no other 2-byte opaque type appears in Keras
    checkpoints, and `walk` demotes one whose attribute names another type.
    """
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        return dtype
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None:
        return bfloat16()
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
    # Bytes declared and stored by the tensors not read raw, over the whole file: many
    # bombs each under the floor must not add up to gigabytes of fill values.
    expanded = [0, 0]
    try:
        root = h5py.h5g.open(h5.id, b"/")
        datasets = _datasets(root, path)
        for name, link in datasets.items():
            dset = h5py.h5d.open(root, link)
            tensor, stored = _tensor(path, name, dset, is_averaged, base_offset, data_end)
            tensors[name] = tensor
            if tensor.offset is None:
                expanded[0] += tensor.nbytes
                expanded[1] += stored
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(path, f"damaged HDF5 structure ({_reason(exc)})") from None
    declared, stored = expanded
    if declared > EXPANSION_FLOOR_BYTES and declared > MAX_EXPANSION * stored:
        raise UnsafeCheckpoint(
            path,
            f"its chunked or compressed tensors declare {declared} bytes but store only "
            f"{stored}; refusing a decompression bomb",
        )
    return tensors


def _datasets(root: h5py.h5g.GroupID, path: str) -> dict[str, bytes]:
    """Every dataset of the file: its name and its link path, in link order.

    Refuses a link that is not a plain hard link (external links read other files, soft
    links can dangle or loop), an object reached by two links (a cycle or an alias), and a
    named datatype. Two traversals in C (links, then objects) instead of one Python call
    per object: the per-object cost dominates models of hundreds of small tensors.
    """
    links: list[tuple[bytes, int]] = []
    odd: list[tuple[bytes, int]] = []

    def on_link(name: bytes, info: h5py.h5l.LinkInfo) -> int | None:
        if info.type != h5py.h5l.TYPE_HARD:
            odd.append((name, info.type))
            return 1  # stop the traversal
        links.append((name, info.u))
        return None

    root.links.visit(on_link, info=True)
    if odd:
        raw, kind = odd[0]
        name = raw.decode("utf-8", "replace")
        if kind == h5py.h5l.TYPE_EXTERNAL:
            target = root.links.get_val(raw)[0].decode("utf-8", "replace")
            raise UnsafeCheckpoint(path, f"{name} is an external link to {target}")
        raise UnsafeCheckpoint(path, f"{name} is a soft link; checkpoints must be plain")
    types: dict[int, int] = {}

    def on_object(name: bytes, info: h5py.h5o.ObjInfo) -> None:
        types[info.addr] = info.type

    h5py.h5o.visit(root, on_object, info=True)
    seen = {h5py.h5o.get_info(root).addr}
    datasets: dict[str, bytes] = {}
    for raw, address in links:
        name = raw.decode("utf-8", "replace")
        if address in seen:
            raise UnsafeCheckpoint(path, f"{name} links to an object seen before (a cycle)")
        seen.add(address)
        kind = types.get(address)
        if kind == h5py.h5o.TYPE_DATASET:
            datasets[name] = raw
        elif kind == h5py.h5o.TYPE_NAMED_DATATYPE:
            raise UnsafeCheckpoint(path, f"{name} is a named datatype, not a tensor")
        elif kind != h5py.h5o.TYPE_GROUP:
            raise CheckpointError(path, f"damaged HDF5 structure (object {name} not found)")
    return datasets


GCOL_SIGNATURE = b"GCOL"
MAX_COLLECTION = 64 << 20
SCAN_BLOCK = 1 << 20


def check_global_heaps(
    extents: list[tuple[int, int]],
    read_at: Callable[[int, int], bytes],
    sizeof_size: int,
    path: str,
    base_offset: int,
    data_end: int,
) -> None:
    """Refuse a damaged global heap collection before libhdf5 parses it.

    Variable-length strings (most attributes Keras writes) live in global heap collections
    ("GCOL" blocks). libhdf5 walks a collection's objects by their declared sizes; a free
    object of size 0 makes it loop forever in C, where no signal can stop it. The bytes
    outside the contiguous datasets (`extents`, physical ``(start, end)`` pairs from
    `walk`) are scanned for collections, and each is walked here the way libhdf5 would,
    first. `read_at(offset, size)` reads the HDF5 file's bytes at `offset` (physical,
    `base_offset` included); `sizeof_size` is the file's "size of lengths".
    """
    gaps = gaps_between(extents, base_offset, data_end)
    checked: set[int] = set()
    for gap_start, gap_end in gaps:
        position = gap_start
        while position < gap_end:
            size = min(SCAN_BLOCK, gap_end - position)
            block = read_at(position, size)
            hit = block.find(GCOL_SIGNATURE)
            while hit >= 0:
                if position + hit not in checked:
                    checked.add(position + hit)
                    _check_collection(read_at, path, position + hit, data_end, sizeof_size)
                hit = block.find(GCOL_SIGNATURE, hit + 1)
            if position + size >= gap_end:
                break
            position += size - len(GCOL_SIGNATURE) + 1  # overlap: a signature across blocks


def gaps_between(extents: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The ranges of ``start … end`` not covered by `extents` (``(start, end)`` pairs)."""
    gaps, position = [], start
    for first, last in sorted(extents):
        if first > position:
            gaps.append((position, min(first, end)))
        position = max(position, last)
    if position < end:
        gaps.append((position, end))
    return gaps


def _check_collection(
    read_at: Callable[[int, int], bytes], path: str, at: int, data_end: int, sizeof_size: int
) -> None:
    header = 8 + sizeof_size  # "GCOL", version, 3 reserved, collection size
    if at + header > data_end:
        return
    head = read_at(at, header)
    size = int.from_bytes(head[8:], "little")
    if head[4] != 1 or size < header or size > MAX_COLLECTION or at + size > data_end:
        return  # not a collection libhdf5 would walk (it rejects these itself)
    body = read_at(at, size)
    object_header = 8 + sizeof_size  # index, references, reserved, object size
    p = header
    while p < size:
        if p + object_header > size:
            break  # libhdf5 treats a tail too short for a header as free space
        index = int.from_bytes(body[p : p + 2], "little")
        length = int.from_bytes(body[p + 8 : p + 8 + sizeof_size], "little")
        need = object_header + (length + 7) // 8 * 8 if index else length
        if need == 0 or need > size - p:
            raise UnsafeCheckpoint(
                path,
                f"damaged HDF5 global heap at byte {at} (libhdf5 would loop or overrun on it)",
            )
        p += need


def _tensor(
    path: str,
    name: str,
    dset: h5py.h5d.DatasetID,
    is_averaged: Callable[[str], bool],
    base_offset: int,
    data_end: int,
) -> tuple[Tensor, int]:
    """Check one dataset and describe it; also returns its stored byte count."""
    dcpl = dset.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise UnsafeCheckpoint(path, f"{name} is a virtual dataset (reads other files)")
    if dcpl.get_external_count():
        raise UnsafeCheckpoint(path, f"{name} keeps its data in external files")
    type_id = dset.get_type()
    storage = type_id.dtype
    space = dset.get_space()
    null = space.get_simple_extent_type() == h5py.h5s.NULL
    shape: tuple[int, ...] = () if null else tuple(int(n) for n in space.shape)
    declared = 0 if null else math.prod(shape) * storage.itemsize
    stored = dset.get_storage_size()
    offset = None
    if layout == h5py.h5d.CONTIGUOUS and dcpl.get_nfilters() == 0 and declared > 0:
        raw = dset.get_offset()
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
    dtype = None if null else numeric_dtype(storage)
    averaged = dtype is not None and is_averaged(name)
    if averaged and dtype.kind == "f" and not any(map(type_id.equal, IEEE_FLOATS)):
        # numpy (and the raw reads) would take its bytes for IEEE; HDF5 would convert them.
        raise CheckpointError(path, f"tensor {name} is stored in a non-IEEE floating-point format")
    return Tensor(name, shape, dtype or storage, storage, averaged, offset), stored


def confirm_opaque_types(h5: h5py.File, tensors: dict[str, Tensor]) -> None:
    """Demote an opaque 2-byte tensor whose ``dtype`` attribute names something other than
    bfloat16 to a copied tensor. Run after `check_global_heaps`: the attribute is a string
    kept in a global heap, which libhdf5 must not parse before that check."""
    for name, tensor in list(tensors.items()):
        if tensor.averaged and tensor.storage.kind == "V" and tensor.dtype == bfloat16():
            marker = h5[name].attrs.get("dtype")
            if marker is not None and _text(marker) != "bfloat16":
                tensors[name] = Tensor(
                    name, tensor.shape, tensor.storage, tensor.storage, False, tensor.offset
                )


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


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
