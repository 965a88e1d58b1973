"""Sharded Keras weights: ``m.weights.json`` naming ``m_00000.weights.h5``, ... beside it.

The index is checked name by name (`sharded.index`), every shard is opened once as an HDF5
checkpoint, and index and shards must agree exactly: each tensor in one shard only, in a
group the index lists for that shard, and each listed group present there. The output is
sharded like this checkpoint and committed through its index (`sharded.commit`). Nothing
here opens a file outside the index's own folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from wavg.errors import CheckpointError, UnsafeCheckpoint
from wavg.formats.base import Writer
from wavg.formats.composite import CompositeCheckpoint, PartsWriter
from wavg.formats.h5file import H5Checkpoint
from wavg.formats.layouts import KERAS3_WEIGHTS, SHARDED_WEIGHTS
from wavg.formats.sharded.commit import ShardedCommit
from wavg.formats.sharded.index import MAX_INDEX_BYTES, ShardIndex, parse_index
from wavg.storage.bytesource import ByteSource


class ShardedCheckpoint(CompositeCheckpoint):
    """A ``.weights.json`` index and its shards, read as one checkpoint."""

    def __init__(self, index_file: ByteSource) -> None:
        path = index_file.path
        self._index_file = index_file
        if index_file.size > MAX_INDEX_BYTES:
            raise UnsafeCheckpoint(path, f"the index is over {MAX_INDEX_BYTES >> 20} MB")
        self.index: ShardIndex = parse_index(index_file.read_at(0, index_file.size), path)
        index_file.release()
        super().__init__(path, SHARDED_WEIGHTS, [index_file])
        parts: list[tuple[str, H5Checkpoint]] = []
        try:
            seen: dict[object, str] = {}
            for name in self.index.shards:
                file = self._open_shard(name)
                # The same file under two names (a hard link).
                if file.file_key in seen:
                    file.release()
                    raise UnsafeCheckpoint(
                        path, f"shards {seen[file.file_key]} and {name} are one file"
                    )
                seen[file.file_key] = name
                try:
                    parts.append((name, self._open_part(file, KERAS3_WEIGHTS)))
                except BaseException:
                    file.release()
                    raise
            self._set_parts(parts)
            self._check_agreement()
        except BaseException:
            for _, part in parts:
                part.close()
            raise

    def _open_shard(self, name: str) -> ByteSource:
        """The shard `name` beside the index (a plain name, checked by `parse_index`)."""
        if self._index_file.links:
            self._refuse_link_out(name)
        try:
            return self._index_file.sibling(name)
        except CheckpointError as exc:
            raise type(exc)(self.path, f"shard {name}: {exc.problem}") from None

    def _refuse_link_out(self, name: str) -> None:
        """A shard beside a local index must exist and may be a symlink only within the
        index's folder."""
        folder = Path(self.path).parent
        shard = folder / name
        try:
            st = os.lstat(shard)
        except FileNotFoundError:
            raise CheckpointError(self.path, f"names shard {name}, which is missing") from None
        except OSError as exc:
            raise CheckpointError(self.path, f"shard {name}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(shard))
            if target.parent != Path(os.path.realpath(folder)):
                raise UnsafeCheckpoint(
                    self.path, f"shard {name} is a symlink leading out of the index's folder"
                )

    def _check_agreement(self) -> None:
        """Index and shards describe the same tensors, each in exactly one shard."""
        listed = {(g, s) for g, shards in self.index.weight_map.items() for s in shards}
        held: set[tuple[str, str]] = set()
        for name, part in self.parts:
            for tensor in part.tensors:
                group = "/" + tensor.rpartition("/")[0]
                if (group, name) not in listed:
                    raise CheckpointError(
                        part.path,
                        f"holds tensor {tensor}, which {Path(self.path).name} does not list there",
                    )
                held.add((group, name))
        missing = sorted(listed - held)
        if missing:
            group, name = missing[0]
            raise CheckpointError(
                self.path, f"lists {group} in shard {name}, which holds no tensor of it"
            )

    @contextlib.contextmanager
    def output(self, out: Path, keep: Callable[[str], bool] | None) -> Iterator[Writer]:
        """Shards like this checkpoint's, under new names; the index is the commit point."""
        kept = [
            (name, part)
            for name, part in self.parts
            if keep is None or any(keep(t) for t in part.tensors)
        ]
        with ShardedCommit(out) as target:
            renamed: dict[str, str] = {}
            writers: list[Writer] = []
            try:
                for number, (name, part) in enumerate(kept):
                    path = target.new_shard(number)
                    renamed[name] = path.name
                    writers.append(part.make_writer(str(path), keep))
                yield PartsWriter(writers, lambda: target.prepare(self._index_for(renamed, keep)))
            finally:
                for each in writers:
                    each.close()
            target.commit()

    def _index_for(self, renamed: dict[str, str], keep: Callable[[str], bool] | None) -> bytes:
        """The newest's index with the new shard names (and dropped groups left out)."""
        weight_map: dict[str, str | list[str]] = {}
        for group, shards in self.index.weight_map.items():
            if keep is not None and not keep(group.lstrip("/")):
                continue
            names = [renamed[s] for s in shards if s in renamed]
            if names:
                weight_map[group] = names if self.index.listed_as_list[group] else names[0]
        document = dict(self.index.document)
        document["weight_map"] = weight_map
        if keep is not None and isinstance(document.get("metadata"), dict):
            total = sum(t.nbytes for n, t in self.tensors.items() if keep(n))
            document["metadata"] = {**document["metadata"], "total_size": float(total)}
        return json.dumps(document, indent=4).encode()
