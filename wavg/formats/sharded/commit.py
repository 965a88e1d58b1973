"""Commit a sharded output ``<base>.weights.json`` and its shards, on a local disk or in a bucket.

No step covers several files, so the index is the commit point, put last, and what the
previous output needed is removed only after it, and only when no index beside it names it.
One protocol for both targets (`wavg.storage.target`); it never removes a file outside the
output's own name family, nor one that an index in the output's folder names.

The steps of a run:

1. its marker ``.<name>.wavg-tmp-<pid>-<token>`` is put, whole: a JSON object with the
   writing ``host``, ``pid``, ``started`` (Unix time) and ``replaces`` (the shards the
   previous index names);
2. the new shards, named ``<base>_NNNNN.wavg-<token>.weights.h5`` (no Keras shard name has
   that form, and no previous output's), are written and published;
3. the placeholder ``<base>_00000.weights.h5``, an empty HDF5 file that the index does not
   name, is put only if no file has that name (Keras' loader opens it before it reads the
   map; the previous output's first shard serves until the commit);
4. the index is put: the commit point;
5. the shards the previous index named and no index names now are removed (its ``_00000``
   becomes the placeholder instead), then the marker.

A run that fails before its commit removes what it created, unless it cannot tell whether
its index landed (then its marker lets the next run judge).

**The stale rule** (one for both targets): a marker is a dead run's when it was written more
than `MARKER_TTL` ago, or on this host by a process that is gone. Before it writes anything,
a run removes what dead runs left, when no index names it: the shards bearing their token,
the shards they replaced, and then their markers. A marker whose run may live protects its
shards. Markers of the previous release are judged by the same rule: its bucket markers
(``.<name>.wavg-tmp-<token>``) hold the same JSON object; its local markers
(``.<name>.wavg-tmp-<pid>-<token>``, empty or a JSON list of the shards they replaced) were
written on this host by the process their name gives.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import time
import warnings
from functools import cache
from pathlib import Path

from wavg._runtime import signals_held
from wavg.errors import CheckpointError, CleanupWarning, OutputError
from wavg.formats.sharded.index import MAX_INDEX_BYTES, keras_base, parse_index
from wavg.storage.atomic import TMP_MARKER, process_alive
from wavg.storage.target import Target, target_for

# A marker older than this belongs to a dead run whatever host wrote it (no combine runs for
# a day); on the host that wrote it, a gone process says so at once.
MARKER_TTL = 24 * 3600


@cache
def placeholder_bytes() -> bytes:
    """An empty HDF5 file: what Keras' loader finds at ``<base>_00000.weights.h5``."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w"):
        pass
    return buffer.getvalue()


def placeholder_name(index_name: str) -> str:
    return f"{keras_base(index_name)}_00000.weights.h5"


@cache
def shard_pattern(base: str) -> re.Pattern[str]:
    """The names of index `base`'s shards, Keras' own and wavg's (``.wavg-<token>``)."""
    return re.compile(rf"{re.escape(base)}_\d{{5}}(\.wavg-[0-9a-f]{{8}})?\.weights\.h5")


def own_pattern(base: str) -> re.Pattern[str]:
    """The names wavg gives index `base`'s shards; group 1 is the writing run's token."""
    return re.compile(rf"{re.escape(base)}_\d{{5}}\.wavg-([0-9a-f]{{8}})\.weights\.h5")


def marker_pattern(index_name: str) -> re.Pattern[str]:
    """Markers for index `index_name`: group 1 the pid (absent in old bucket markers), 2 the
    run's token."""
    return re.compile(rf"\.{re.escape(index_name)}{re.escape(TMP_MARKER)}(?:(\d+)-)?([0-9a-f]+)")


class ShardedCommit:
    """One run's commit of a sharded output at `out` (use as a context manager).

    Inside the block the caller creates shards with `new_shard`, writes and fsyncs them,
    then calls `prepare` with the index's bytes, then `commit`. Leaving the block without a
    commit (an error, a signal) removes every file this run created; after the commit the
    previous output's stale shards are removed.
    """

    def __init__(self, out: Path) -> None:
        self.target: Target = target_for(out)
        self.name = out.name
        self.base = keras_base(out.name)
        self.token = os.urandom(4).hex()
        self.marker = f".{out.name}{TMP_MARKER}{os.getpid()}-{self.token}"
        self.created: list[str] = []
        self.index: bytes | None = None
        self.commit_tried = False
        self.committed = False
        self.previous: set[str] = set()

    def __enter__(self) -> ShardedCommit:
        target = self.target
        target.check_file()
        clean_leftovers(target, self.token)
        self.previous = _index_names(target, target.entries(), self.name) or set()
        stamp = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "replaces": sorted(self.previous),
        }
        try:
            if not self._put_new(self.marker, json.dumps(stamp).encode()):
                raise OutputError(target.display, f"{self.marker} exists already")
        except BaseException:  # a signal just after the marker was created
            self.__exit__(None, None, None)
            raise
        return self

    def _put_new(self, name: str, data: bytes) -> bool:
        # Recorded before it exists: a signal right after creating it must remove it too.
        self.created.append(name)
        if self.target.put(name, data, new=True):
            return True
        self.created.remove(name)  # not ours: never remove it
        return False

    def new_shard(self, number: int) -> Path:
        """Create (empty) the output's shard `number`; return the local path to write."""
        name = f"{self.base}_{number:05}.wavg-{self.token}.weights.h5"
        self.created.append(name)
        try:
            return self.target.create(name)
        except FileExistsError:
            self.created.remove(name)
            raise OutputError(self.target.display, f"{name} exists already") from None

    def prepare(self, index: bytes) -> int:
        """Publish the shards (complete and fsynced) and the placeholder, and keep the index
        for the commit. Returns the bytes the commit writes besides the shards."""
        for name in self.created[1:]:
            self.target.publish(name)
        written = len(index)
        placeholder = placeholder_name(self.name)
        if placeholder not in self.target.entries() and self._put_new(
            placeholder, placeholder_bytes()
        ):
            written += len(placeholder_bytes())
        self.target.sync()  # the shards' names before the index's
        self.index = index
        return written

    def commit(self) -> None:
        """The commit point: the index replaces the previous one in one step."""
        assert self.index is not None, "prepare before commit"
        self.commit_tried = True
        self.target.put(self.name, self.index)
        self.committed = True
        self.target.sync()

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            # An upload may fail after the service took it: then the index says so.
            landed = self.commit_tried and self.target.read(self.name, MAX_INDEX_BYTES)
            if landed is None:
                return  # cannot tell: the marker lets the next run judge
            if landed != self.index:
                with signals_held():  # a second SIGTERM must not cut the removal short
                    for name in reversed(self.created):
                        self.target.delete(name)
                return
        # The new output is in place; tidying up is cleanup (the next run finishes it).
        try:
            retired = _retire(self.target, self.previous, set())
        except (OSError, OutputError) as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            retired = False
        else:
            problem = "its index could not be read back"
        if retired:
            self.target.delete(self.marker)
        else:
            warnings.warn(
                CleanupWarning(
                    f"{self.target.display}: written, but the previous output's shards were "
                    f"not removed ({problem}); the next run for this output removes them"
                ),
                stacklevel=2,
            )


def clean_leftovers(target: Target, own_token: str = "") -> None:
    """Finish or undo what dead runs for the target's output left: their markers name it.

    Markers are listed before the indexes are read: a shard whose run committed in between
    is then named by the index that is read.
    """
    entries = target.entries()
    markers = marker_pattern(target.name)
    doomed: set[str] = set()
    tokens: set[str] = set()
    dead: list[str] = []
    for entry, size in entries.items():
        found = markers.fullmatch(entry)
        if not found or found[2] == own_token:
            continue
        replaced = _dead_run(target, entry, size, found[1])
        if replaced is not None:
            doomed |= replaced
            tokens.add(found[2])
            dead.append(entry)
    if not dead or _retire(target, doomed, tokens):
        for entry in dead:  # after their shards: a marker is what finds them again
            target.delete(entry)
        target.remove_dead_temps(markers.fullmatch)


def _dead_run(target: Target, marker: str, size: int | None, pid: str | None) -> set[str] | None:
    """The shards a dead run's marker says it replaced; None while its run may live (or if
    the marker is not wavg's to judge)."""
    body = target.read(marker, MAX_INDEX_BYTES) if size is not None else None
    if body is None:
        return None
    try:
        stamp = json.loads(body) if body else None
    except (ValueError, RecursionError):
        stamp = None
    if isinstance(stamp, dict):
        try:
            started, host = float(stamp["started"]), str(stamp["host"])
            gone = host == socket.gethostname() and not process_alive(int(stamp["pid"]))
            replaced = {n for n in stamp.get("replaces", []) if isinstance(n, str)}
        except (KeyError, TypeError, ValueError):
            stamp = None  # another JSON file: a temporary index
        else:
            return replaced if gone or time.time() - started > MARKER_TTL else None
    # No stamp: the previous release's local marker (empty, or the list of shards it
    # replaced) or a temporary file, both written on this host by the process named.
    if pid is None or process_alive(int(pid)):
        return None
    return {n for n in stamp if isinstance(n, str)} if isinstance(stamp, list) else set()


def _retire(target: Target, doomed: set[str], tokens: set[str]) -> bool:
    """Remove the output's shards in `doomed` or bearing one of `tokens` that no index beside
    it names; the ``_00000`` becomes the placeholder instead (Keras' loader opens it).
    False, removing nothing, when the output's index cannot be read (it may need anything)."""
    entries = target.entries()
    used = _index_names(target, entries, target.name)
    if used is None:
        return False
    for other in entries:
        if other != target.name and other.endswith(".json"):
            used |= _index_names(target, entries, other) or set()
    base = keras_base(target.name)
    family, own = shard_pattern(base), own_pattern(base)
    placeholder = placeholder_name(target.name)
    for name, size in entries.items():
        if name in used or not family.fullmatch(name):
            continue
        found = own.fullmatch(name)
        if name not in doomed and not (found and found[1] in tokens):
            continue
        if name != placeholder:
            target.delete(name)
        elif size is not None and size != len(placeholder_bytes()):
            with contextlib.suppress(OSError, OutputError):
                target.put(name, placeholder_bytes())
    return True


def _index_names(target: Target, entries: dict[str, int | None], name: str) -> set[str] | None:
    """The shard names the index `name` names: empty if there is none, None if unreadable."""
    if name not in entries:
        return set()
    size = entries[name]
    data = target.read(name, MAX_INDEX_BYTES) if size is None or size <= MAX_INDEX_BYTES else None
    if data is None:
        return None
    try:
        return set(parse_index(data, name).shards)
    except CheckpointError:
        return None
