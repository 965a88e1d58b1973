"""Upload a committed local output to object storage, and retire what the previous one needed.

`staged_upload` builds the output in a private local folder; this module puts it where the
URL says. One object appears whole or not at all, but no request covers several, so a
multi-file output has one object as its commit point, uploaded last, and what the previous
output needed is deleted only after it, and only when nothing still names it:

- Sharded weights ``<prefix>/<base>.weights.json``: a marker object
  ``.<name>.wavg-tmp-<token>`` is put first (host, pid, start time, and the shards the
  previous index names); then the new shards, whose names carry the run's token
  (``<base>_NNNNN.wavg-<token>.weights.h5``, never a previous output's name); then the
  placeholder ``<base>_00000.weights.h5`` that Keras' loader opens, only if no object has
  that name; then the index, the commit point. After it, the previous index's shards that no
  index under the prefix names are deleted (its ``_00000`` becomes the placeholder instead),
  then the marker. A killed run leaves its marker; the next run for the output finds it dead
  (written on this host by a process that is gone, or older than `MARKER_TTL`) and deletes,
  when no index names them, the shards bearing its token and those its previous index named.
  A live run's marker keeps its shards; a run that fails before its commit deletes its own.
- Unzipped ``.keras`` folder ``<prefix>/<name>/``: replaced only when it is empty or holds a
  ``config.json``; every file is uploaded, ``config.json`` last (what Keras reads first),
  then objects under the folder that the new one lacks are deleted.
- Anything else is one object: uploaded whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wavg.errors import CheckpointError, OutputError
from wavg.formats.commit.local import (
    own_pattern,
    placeholder_bytes,
    placeholder_name,
    shard_pattern,
)
from wavg.formats.sharded.index import MAX_INDEX_BYTES, keras_base, parse_index
from wavg.storage.atomic import TMP_MARKER, process_alive
from wavg.storage.locations import redact
from wavg.storage.remote import _retrying, check_output_bucket, filesystem, upload

# A marker older than this belongs to a dead run whatever host wrote it (no combine runs for
# a day); on the host that wrote it, a gone process says so at once.
MARKER_TTL = 24 * 3600
CONFIG = "config.json"


@contextlib.contextmanager
def staged_upload(url: str) -> Iterator[Path]:
    """A local path in a private temporary directory standing for the output `url`.

    The format commits its output there as it would anywhere (see `Checkpoint.output`); when
    the block exits normally, it is uploaded to `url`, a multi-file output with its commit
    point last and the previous output's leftovers retired after it (`commit_upload`), then
    the directory is removed. If the block raises, nothing is uploaded.
    """
    check_output_bucket(url)
    directory = Path(tempfile.mkdtemp(prefix="wavg-upload-"))
    try:
        local = directory / url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        yield local
        commit_upload(directory, local, url)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def commit_upload(directory: Path, local: Path, url: str) -> None:
    """Upload the output committed at `local` (inside the staging `directory`) to `url`;
    nothing when nothing was committed there (a dry run)."""
    if not os.path.lexists(local):
        return
    if local.is_dir():
        _Prefix(url).commit_folder(local)
    elif local.name.endswith(".json") and any(p != local for p in directory.iterdir()):
        _Prefix(url).commit_sharded(local)
    else:
        upload([(local, url)])


def check_folder_target(url: str) -> None:
    """Fail before any tensor is read if a model folder may not be written at `url`."""
    _Prefix(url).check_folder()


class _Prefix:
    """The objects directly under the output's folder in the bucket, by name."""

    def __init__(self, url: str) -> None:
        self.url = url.split("?", 1)[0].rstrip("/")
        self.display = redact(url)
        self.fs, key = filesystem(url)
        self.key = key.rstrip("/")
        self.folder_key, _, self.name = self.key.rpartition("/")
        self.folder_url = self.url.rpartition("/")[0]

    def _call(self, what: Any) -> Any:
        return _retrying(what, self.display, OutputError)

    def listing(self, key: str) -> dict[str, dict]:
        """Name -> info of the objects directly under `key` (none if it holds nothing)."""

        def attempt() -> list[dict]:
            self.fs.invalidate_cache(key)
            try:
                return self.fs.ls(key, detail=True)
            except FileNotFoundError:
                return []

        return {
            info["name"].rstrip("/").rpartition("/")[2]: info
            for info in self._call(attempt)
            if info.get("type") != "directory"
        }

    def read(self, name: str, info: dict) -> bytes | None:
        """A small object's bytes (an index, a marker), or None if too big or unreadable."""
        if int(info.get("size") or 0) > MAX_INDEX_BYTES:
            return None
        try:
            return self._call(lambda: self.fs.cat_file(f"{self.folder_key}/{name}"))
        except (OutputError, CheckpointError):
            return None

    def delete(self, keys: list[str]) -> None:
        """Best effort: what is left is found again by the next run."""
        for key in keys:
            with contextlib.suppress(Exception):
                self._call(lambda key=key: self.fs.rm_file(key))

    # -- sharded weights -------------------------------------------------------------------

    def commit_sharded(self, local: Path) -> None:
        base = keras_base(local.name)
        own = own_pattern(base)
        shards = sorted(p for p in local.parent.iterdir() if own.fullmatch(p.name))
        token = own.fullmatch(shards[0].name)[1] if shards else os.urandom(4).hex()
        placeholder = local.parent / placeholder_name(local)
        before = self.listing(self.folder_key)
        previous = self._index_names(before) if local.name in before else set()
        marker = f"{self.folder_key}/.{local.name}{TMP_MARKER}{token}"
        stamp = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "replaces": sorted(previous or ()),
        }
        self._call(lambda: self.fs.pipe_file(marker, json.dumps(stamp).encode()))
        uploaded: list[str] = []
        try:
            files = list(shards)
            if placeholder.name not in before and placeholder.exists():
                files.append(placeholder)
            for path in files:
                upload([(path, f"{self.folder_url}/{path.name}")])
                uploaded.append(f"{self.folder_key}/{path.name}")
            upload([(local, self.url)])  # the commit point
        except BaseException:
            self._undo(uploaded, marker)
            raise
        self._retire(base, previous, token)
        self.delete([marker])

    def _undo(self, uploaded: list[str], marker: str) -> None:
        """After a failure: delete this run's uploads unless the index names them (its
        upload may have failed after the service took it). Undecided, they stay with the
        marker for the next run to judge."""
        with contextlib.suppress(Exception):
            used = self._index_names(self.listing(self.folder_key))
            if used is not None:
                self.delete([k for k in uploaded if k.rpartition("/")[2] not in used])
                if not used & {k.rpartition("/")[2] for k in uploaded}:
                    self.delete([marker])

    def _index_names(self, listing: dict[str, dict], name: str | None = None) -> set[str] | None:
        """The shard names the index `name` (the output's own by default) names; None when
        it cannot be read (then it may need anything)."""
        name = name or self.name
        data = self.read(name, listing[name]) if name in listing else b""
        if data is None:
            return None
        if not data:
            return set()
        try:
            return set(parse_index(data, name).shards)
        except CheckpointError:
            return None

    def _retire(self, base: str, previous: set[str] | None, token: str) -> None:
        """Delete, when no index under the prefix names them: the previous output's shards,
        and what killed runs left (the shards bearing their token, and those they replaced)."""
        listing = self.listing(self.folder_key)
        used = self._index_names(listing)
        if used is None:
            return  # an index we cannot read may need anything: leave everything
        for other in listing:
            if other != self.name and other.endswith(".json"):
                used |= self._index_names(listing, other) or set()
        markers = re.compile(rf"\.{re.escape(self.name)}{re.escape(TMP_MARKER)}([0-9a-f]+)")
        doomed, dead_tokens, dead_markers = set(previous or ()), set(), []
        for name, info in listing.items():
            found = markers.fullmatch(name)
            if not found or found[1] == token:
                continue
            replaced = self._dead_marker(name, info)
            if replaced is not None:
                dead_tokens.add(found[1])
                dead_markers.append(f"{self.folder_key}/{name}")
                doomed |= replaced
        family, own = shard_pattern(base), own_pattern(base)
        stale = []
        for name in listing:
            if name in used or not family.fullmatch(name):
                continue
            found = own.fullmatch(name)
            if name in doomed or (found and found[1] in dead_tokens):
                stale.append(name)
        first = placeholder_name(Path(self.name))
        if first in stale:
            stale.remove(first)
            if int(listing[first].get("size") or 0) != len(placeholder_bytes()):
                with contextlib.suppress(Exception):
                    key = f"{self.folder_key}/{first}"
                    self._call(lambda: self.fs.pipe_file(key, placeholder_bytes()))
        self.delete([f"{self.folder_key}/{n}" for n in stale])
        self.delete(dead_markers)  # after their shards: a marker is what finds them again

    def _dead_marker(self, name: str, info: dict) -> set[str] | None:
        """The names a killed run's marker says it replaced, or None if its run may live."""
        data = self.read(name, info)
        try:
            stamp = json.loads(data or b"")
            started, host, pid = float(stamp["started"]), str(stamp["host"]), int(stamp["pid"])
            replaced = {n for n in stamp.get("replaces", []) if isinstance(n, str)}
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # not ours to judge
        if time.time() - started > MARKER_TTL:
            return replaced
        if host == socket.gethostname() and not process_alive(pid):
            return replaced
        return None

    # -- unzipped .keras folders -----------------------------------------------------------

    def check_folder(self) -> list[str]:
        """The objects under the output folder; refused unless it is empty or a model."""
        before = self._folder_listing()
        if before and CONFIG not in before:
            raise OutputError(
                self.display,
                "exists and is not a Keras model folder (no config.json); wavg replaces only those",
            )
        return before

    def commit_folder(self, local: Path) -> None:
        before = self.check_folder()  # again: it may have changed since the run began
        files = sorted(
            (p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()),
            key=lambda r: (r == CONFIG, r),
        )
        upload([(local / r, f"{self.url}/{r}") for r in files])
        self.delete([f"{self.key}/{r}" for r in sorted(set(before) - set(files))])

    def _folder_listing(self) -> list[str]:
        """Every object under the folder, relative to it."""

        def attempt() -> list[str]:
            self.fs.invalidate_cache(self.key)
            try:
                return self.fs.find(self.key)
            except FileNotFoundError:
                return []

        prefix = self.key + "/"
        return [p[len(prefix) :] for p in self._call(attempt) if p.startswith(prefix)]
