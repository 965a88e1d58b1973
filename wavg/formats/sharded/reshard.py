"""Any checkpoint whose weights Keras 3 keeps in one HDF5 tree, written as sharded weights.

A ``.weights.h5``, a ``.keras`` archive or folder and a sharded ``.weights.json`` all hold
the same ``layers/<name>/vars/<i>`` tree, which Keras' loader also reads from an index and
its shards: here that tree is cut into shards by Keras' own rule (`keras_shards`), each
shard's HDF5 structure is copied from the newest input, and the averaged values are filled
in afterwards. Which shards to write, and under which numbers, is the caller's plan; how
they are committed is `sharded.commit`'s. Nothing here averages or reads a value it does
not copy.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from wavg.errors import UsageError
from wavg.formats.base import Checkpoint, Tensor, Writer
from wavg.formats.composite import CompositeCheckpoint, PartsWriter
from wavg.formats.hdf5.reader import Hdf5Checkpoint
from wavg.formats.hdf5.skeleton import as_bytes, copy_attrs, create_empty_like, pwrite_all
from wavg.formats.layouts import KERAS3_WEIGHTS, KERAS_ARCHIVE, KERAS_FOLDER, SHARDED_WEIGHTS
from wavg.formats.sharded.commit import ShardedCommit

# The layouts whose weights are Keras 3's ``layers/.../vars`` tree (what an index maps).
KERAS_TREES = (KERAS3_WEIGHTS, KERAS_ARCHIVE, KERAS_FOLDER, SHARDED_WEIGHTS)
# Keras' `save_weights(..., max_shard_size=)` is in GB of 1024**3 bytes; 5 by default.
DEFAULT_MAX_SHARD_GB = 5.0
GB = 1024**3
# Copied tensors (optimizer state) are copied this many bytes at a time.
COPY_BLOCK_BYTES = 4 << 20


def writes_as_shards(ckpt: Checkpoint, out_name: str, max_shard_gb: float | None) -> bool:
    """Whether an output named `out_name` from `ckpt` is its tree cut into new shards: a
    ``.weights.json`` from another Keras 3 format, or from sharded inputs given a shard size."""
    if not out_name.lower().endswith(".weights.json") or ckpt.layout not in KERAS_TREES:
        return False
    return ckpt.layout != SHARDED_WEIGHTS or max_shard_gb is not None


def keras_shards(tensors: Sequence[Tensor], max_bytes: float) -> list[list[Tensor]]:
    """Cut `tensors`, in order, into shards as Keras' `ShardedH5IOStore` does: a tensor that
    would take its shard past `max_bytes` starts the next one. (Keras refuses a tensor larger
    than `max_bytes`; here it gets a shard of its own.)"""
    shards: list[list[Tensor]] = [[]]
    current = 0
    for tensor in tensors:
        current += tensor.nbytes
        if current > max_bytes and shards[-1]:
            shards.append([])
            current = tensor.nbytes
        shards[-1].append(tensor)
    return [shard for shard in shards if shard]


def group_of(name: str) -> str:
    """The index key of tensor `name`: its ``vars`` group (``/layers/dense/vars``)."""
    return "/" + name.rpartition("/")[0]


def weight_map(shards: Sequence[tuple[str, Sequence[str]]]) -> dict[str, list[str]]:
    """The index's map from each tensor's group to the shards holding it, in shard order."""
    found: dict[str, list[str]] = {}
    for shard, names in shards:
        for name in names:
            listed = found.setdefault(group_of(name), [])
            if shard not in listed:
                listed.append(shard)
    return found


def index_bytes(groups: dict[str, list[str]], total_size: int) -> bytes:
    """An index as Keras writes it (``total_size`` a float, every entry a list)."""
    document = {"metadata": {"total_size": float(total_size)}, "weight_map": groups}
    return json.dumps(document, indent=4).encode()


def _hdf5_of(ckpt: Checkpoint, name: str) -> Hdf5Checkpoint:
    if isinstance(ckpt, CompositeCheckpoint):
        return ckpt.part_of(name)
    if isinstance(ckpt, Hdf5Checkpoint):
        return ckpt
    raise UsageError(f"{ckpt.path}: {ckpt.layout.name} inputs cannot be written as .weights.json")


class ShardFiles(Writer):
    """Writes the shard files `shards` (a local path and its tensors each): their HDF5
    structure, copied from `newest`, and the copied tensors' values at once; the averaged
    tensors' values as the core hands them over, shard after shard."""

    def __init__(self, newest: Checkpoint, shards: Sequence[tuple[Path, Sequence[Tensor]]]) -> None:
        self.newest = newest
        self.offsets: dict[str, tuple[Path, int]] = {}
        self.order = []
        self._fd: int | None = None
        self._open_path: Path | None = None
        self._paths = [path for path, _ in shards]
        for path, tensors in shards:
            offsets = self._lay_out(path, tensors)
            for tensor in tensors:
                if tensor.name in offsets:
                    self.offsets[tensor.name] = (path, offsets[tensor.name])
            averaged = [t.name for t in tensors if t.averaged and t.name in offsets]
            self.order.extend(sorted(averaged, key=offsets.__getitem__))
            for tensor in tensors:
                if not tensor.averaged and tensor.name in offsets:
                    self._copy(tensor)

    def _lay_out(self, path: Path, tensors: Sequence[Tensor]) -> dict[str, int]:
        """The shard's HDF5 tree: each tensor's groups (with their attributes) and an
        allocated, unwritten dataset of its exact type; returns the datasets' offsets."""
        with h5py.File(path, "w") as dst:
            for tensor in tensors:
                part = _hdf5_of(self.newest, tensor.name)
                with part.weights_h5() as src:
                    parent, source = dst, src
                    *groups, key = tensor.name.split("/")
                    for group in groups:
                        source = source[group]
                        if group not in parent:
                            copy_attrs(source, parent.create_group(group))
                        parent = parent[group]
                    create_empty_like(source[key], parent, key)
            dst.flush()
            offsets = {t.name: dst[t.name].id.get_offset() for t in tensors}
        return {name: offset for name, offset in offsets.items() if offset is not None}

    def _copy(self, tensor: Tensor) -> None:
        """A copied tensor's values, read from the newest block by block."""
        budget = max(1, COPY_BLOCK_BYTES // tensor.storage.itemsize)
        scratch = np.empty(0, np.uint8)
        for start, count, slices in self.newest.blocks(tensor, budget):
            if scratch.nbytes < count * 8:
                scratch = np.empty(count * 8, np.uint8)
            data = self.newest.read(tensor, start, count, slices, scratch)
            self.write(tensor, start, data.reshape(-1).view(np.uint8))

    def write(self, tensor: Tensor, start: int, data: np.ndarray) -> None:
        path, offset = self.offsets[tensor.name]
        if path != self._open_path:
            self._close_fd(sync=True)
            self._fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            self._open_path = path
        assert self._fd is not None
        pwrite_all(self._fd, as_bytes(data), offset + start * tensor.storage.itemsize)

    def _close_fd(self, sync: bool) -> None:
        if self._fd is not None:
            try:
                if sync:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
                self._open_path = None

    def finish(self) -> int:
        self._close_fd(sync=True)
        for path in self._paths:  # every shard, also those no value was written to
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return sum(os.path.getsize(path) for path in self._paths)

    def close(self) -> None:
        self._close_fd(sync=False)


def output_tensors(ckpt: Checkpoint, keep: Callable[[str], bool] | None) -> list[Tensor]:
    """The tensors an output of `ckpt` holds, in the order its shards are cut."""
    return [t for name, t in ckpt.tensors.items() if keep is None or keep(name)]


@contextlib.contextmanager
def resharded_output(
    newest: Checkpoint, out: Path, keep: Callable[[str], bool] | None, max_shard_gb: float | None
) -> Iterator[Writer]:
    """The newest's tree as a sharded output at `out`, cut by Keras' rule at `max_shard_gb`
    (Keras' default when None), committed through its index (`sharded.commit`)."""
    gb = DEFAULT_MAX_SHARD_GB if max_shard_gb is None else max_shard_gb
    tensors = output_tensors(newest, keep)
    for tensor in tensors:
        _hdf5_of(newest, tensor.name)  # refuse before anything is written
    shards = keras_shards(tensors, gb * GB)
    with ShardedCommit(out) as commit:
        paths = [commit.new_shard(number) for number in range(len(shards))]
        writer = ShardFiles(newest, list(zip(paths, shards, strict=True)))
        named = [(p.name, [t.name for t in s]) for p, s in zip(paths, shards, strict=True)]
        total = sum(t.nbytes for t in tensors)
        try:
            yield PartsWriter(
                [writer], lambda: commit.prepare(index_bytes(weight_map(named), total))
            )
        finally:
            writer.close()
        commit.commit()
