"""Every byte source keeps the written `ByteSource` contract, and formats rely on nothing else.

Both sources (a local `InputFile`, an object read by `RemoteFile`) must offer every member
of the protocol with its signature, and a format must read the same values whatever the
source's capability flags say: the flags only decide what is worth doing (planning chunk
reads ahead, checking siblings for links), never what is read.
"""

from __future__ import annotations

import inspect
import shutil
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from wavg.formats.base import iter_blocks
from wavg.formats.h5file import H5Checkpoint
from wavg.storage.bytesource import ByteSource, InputSource
from wavg.storage.local import InputFile

SAMPLES = sorted(Path(__file__).parents[2].joinpath("sample_checkpoints").glob("*.h5"))


def _members(protocol: type) -> dict[str, object]:
    """The protocol's attributes (annotations) and methods, its bases' included."""
    found: dict[str, object] = {}
    for cls in reversed(protocol.__mro__):
        if cls in (ByteSource, InputSource):
            found.update(dict.fromkeys(cls.__annotations__))
            found.update(
                {n: v for n, v in vars(cls).items() if inspect.isfunction(v) and n[0] != "_"}
            )
    return found


def _memory_copy(path: Path) -> str:
    """A URL of fsspec's in-memory filesystem holding `path`'s bytes."""
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://wavg-bytesource/{uuid.uuid4().hex}/{path.name}"
    with fsspec.open(url, "wb") as f:
        f.write(path.read_bytes())
    return url


@pytest.fixture
def sources():
    from wavg.storage.remote import RemoteFile

    opened = [InputFile(str(SAMPLES[0])), RemoteFile(_memory_copy(SAMPLES[0]))]
    yield opened
    for source in opened:
        source.release()


def test_every_byte_source_offers_every_member_of_the_protocol(sources):
    members = _members(ByteSource)
    assert {"read_at", "readinto", "readv", "will_read", "check_unchanged", "release"} <= set(
        members
    )
    assert {"size", "path", "identity", "file_key", "keep_open", "prefetches", "links"} <= set(
        members
    )
    for source in sources:
        assert isinstance(source, ByteSource)
        assert isinstance(source, InputSource)
        for name, declared in members.items():
            value = getattr(source, name)  # raises if missing
            if declared is None:
                continue
            wanted = list(inspect.signature(declared).parameters)
            assert list(inspect.signature(value).parameters) == wanted[1:], (source, name)
        assert isinstance(source.prefetches, bool) and isinstance(source.links, bool)
        assert source.size == SAMPLES[0].stat().st_size
        assert source.read_at(0, 8) == SAMPLES[0].read_bytes()[:8]
        source.check_unchanged()


def test_the_two_sources_give_the_same_bytes_through_every_read(sources):
    expected = SAMPLES[0].read_bytes()
    for source in sources:
        buffer = bytearray(100)
        assert source.readinto(len(expected) - 40, memoryview(buffer)) == 40
        assert bytes(buffer[:40]) == expected[-40:]
        parts = [bytearray(3), bytearray(0), bytearray(5)]
        assert source.readv(10, parts) == 8
        assert b"".join(parts) == expected[10:18]
        source.will_read([(0, 16), (100, 50)], readers=2)
        assert source.read_at(100, 50) == expected[100:150]


class _Flagged(InputFile):
    """A local file claiming the other capability flags, recording its hints."""

    prefetches = True
    links = False

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.hints: list[list[tuple[int, int]]] = []

    def will_read(self, ranges, readers=1) -> None:
        self.hints.append(list(ranges))

    def sibling(self, name: str) -> _Flagged:
        return _Flagged(str(Path(self.path).parent / name))


def _compressed_copy(tmp_path: Path) -> Path:
    """A sample checkpoint with every other tensor chunked and compressed (not raw)."""
    path = tmp_path / SAMPLES[-1].name
    shutil.copy(SAMPLES[-1], path)
    with h5py.File(path, "r+") as f:
        names: list[str] = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names[::2]:
            data, attrs = f[name][()], dict(f[name].attrs)
            if data.ndim == 0:
                continue
            del f[name]
            f.create_dataset(name, data=data, chunks=True, compression="gzip")
            f[name].attrs.update(attrs)
    return path


def _values(ckpt) -> dict[str, np.ndarray]:
    found = {}
    for name, tensor in ckpt.tensors.items():
        scratch = np.empty(tensor.nbytes, np.uint8)
        blocks = [
            ckpt.read(tensor, start, count, slices, scratch).copy()
            for start, count, slices in iter_blocks(tensor.shape, 1, 1000)
        ]
        found[name] = np.concatenate(blocks) if blocks else np.empty(0)
    batch = list(ckpt.tensors.values())
    out = np.empty(sum(t.nbytes for t in batch), np.uint8)
    ckpt.read_many(batch, out)
    found["<read_many>"] = out
    return found


def test_a_format_reads_the_same_whatever_the_source_s_capability_flags(tmp_path):
    path = _compressed_copy(tmp_path)
    plain, flagged = H5Checkpoint(InputFile(str(path))), H5Checkpoint(_Flagged(str(path)))
    try:
        names = list(flagged.tensors)
        plain.will_read(names)
        flagged.will_read(names)
        # Only a source that prefetches is told the compressed tensors' chunks.
        raw = [(t.offset, t.nbytes) for t in flagged.tensors.values() if t.offset is not None]
        assert len(flagged.file.hints) == 1 and len(flagged.file.hints[0]) > len(raw)
        first, second = _values(plain), _values(flagged)
        assert first.keys() == second.keys()
        for name, value in first.items():
            np.testing.assert_array_equal(second[name], value)
    finally:
        plain.close()
        flagged.close()


def test_a_source_without_links_opens_shards_by_name_alone(tmp_path):
    """The sharded reader checks a local index's shards for links out of the folder only
    when its source says names may be links; either way the shards read the same."""
    from wavg.formats import registry
    from wavg.formats.sharded.reader import ShardedCheckpoint

    index = _sharded(SAMPLES[-1], tmp_path / "m.weights.json")
    plain = registry.open_checkpoint(index)
    flagged = ShardedCheckpoint(_Flagged(str(index)))
    try:
        assert plain.tensors.keys() == flagged.tensors.keys()
        first, second = _values(plain), _values(flagged)
        for name, value in first.items():
            np.testing.assert_array_equal(second[name], value)
    finally:
        plain.close()
        flagged.close()


def _sharded(source: Path, out: Path) -> Path:
    """`source`'s tensors as a two-shard Keras index (groups split between the shards)."""
    import json

    with h5py.File(source, "r") as f:
        datasets: list[str] = []
        f.visititems(lambda n, o: datasets.append(n) if isinstance(o, h5py.Dataset) else None)
        groups = sorted({"/" + d.rpartition("/")[0] for d in datasets})
        shards = [f"{out.name.split('.')[0]}_{i:05d}.weights.h5" for i in range(2)]
        weight_map = {}
        for i, shard in enumerate(shards):
            mine = groups[i::2]
            with h5py.File(out.parent / shard, "w") as dst:
                for name in datasets:
                    if "/" + name.rpartition("/")[0] in mine:
                        dst.create_dataset(name, data=f[name][()])
            weight_map.update(dict.fromkeys(mine, shard))
    out.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out
