"""Commit outputs made of several files: a sharded index with its shards, a model folder.

No rename covers several files, so each output has one atomic step as its commit point (the
index replaced with ``os.replace``; the folder swapped with ``renameat2(RENAME_EXCHANGE)``),
everything it refers to is written and fsynced first, and what the previous output needed is
deleted only afterwards. This module never deletes a file that an index in the output's
folder names, nor any file outside the output's own name family.

Sharded output ``<dir>/<base>.weights.json``:

- new shards get unique names ``<base>_NNNNN.wavg-<token>.weights.h5`` (no Keras shard name
  has that form), written while a marker ``.<name>.wavg-tmp-<pid>-<token>`` exists;
- Keras' loader opens ``<base>_00000.weights.h5`` before it reads the map, so that file
  always exists: an empty HDF5 placeholder that the index does not name (or the previous
  output's first shard until the commit);
- the marker lists the previous output's shards that become stale, so a run killed after its
  commit has them removed by the next run; a run killed before it leaves shards bearing its
  marker's token, which no index names, and the next run removes those too. Shards of other
  indexes (an output renamed to keep it, say) carry no dead run's token and are never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from wavg._runtime import signals_held
from wavg.errors import CheckpointError, OutputError
from wavg.formats.sharded.index import MAX_INDEX_BYTES, keras_base, parse_index
from wavg.storage.atomic import (
    TMP_MARKER,
    check_output_dir,
    check_output_parent,
    fsync_directory,
    process_alive,
    remove_stale_temps,
    temp_prefix,
)

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


@cache
def placeholder_bytes() -> bytes:
    """An empty HDF5 file: what Keras' loader finds at ``<base>_00000.weights.h5``."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w"):
        pass
    return buffer.getvalue()


def placeholder_name(out: Path) -> str:
    return f"{keras_base(out.name)}_00000.weights.h5"


class ShardedOutput:
    """One run's commit of a sharded output at `out` (use as a context manager).

    Inside the block the caller creates shards with `new_shard`, writes and fsyncs them,
    then calls `prepare` with the index's bytes, then `commit`. Leaving the block without a
    commit (an error, a signal) removes every file this run created; after the commit the
    previous output's stale shards are removed.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.base = keras_base(out.name)
        self.token = os.urandom(4).hex()
        self.marker = Path(f"{temp_prefix(out)}{os.getpid()}-{self.token}")
        self.created: list[Path] = []
        self.committed = False
        self._stale: list[str] = []

    def __enter__(self) -> ShardedOutput:
        check_output_dir(self.out)
        clean_sharded_leftovers(self.out)
        try:
            self._create(self.marker)
        except BaseException:  # a signal just after the marker was created
            self.__exit__(None, None, None)
            raise
        return self

    def _create(self, path: Path) -> None:
        # Recorded before it exists: a signal right after creating it must remove it too.
        self.created.append(path)
        try:
            os.close(os.open(path, _CREATE, 0o644))
        except FileExistsError:
            self.created.remove(path)  # not ours: never remove it
            raise OutputError(self.out, f"{path.name} exists already") from None
        except OSError as exc:
            raise OutputError(
                self.out, f"cannot create a file in {self.out.parent} ({exc.strerror})"
            ) from None

    def new_shard(self, number: int) -> Path:
        """Create (empty) and return the path of the output's shard `number`."""
        path = self.out.parent / f"{self.base}_{number:05}.wavg-{self.token}.weights.h5"
        self._create(path)
        return path

    def prepare(self, index: bytes) -> int:
        """Write everything the commit needs: placeholder, the index beside `out`, the list
        of shards it makes stale; fsync them and the folder. Returns the bytes written.

        The shards must be complete and fsynced.
        """
        written = self._ensure_placeholder()
        self._index_tmp = Path(f"{self.marker}-index")
        written += _write_synced(self._index_tmp, index, self)
        old = index_names(self.out)
        new = set(parse_index(index, str(self.out)).shards)
        pattern = shard_pattern(self.base)
        self._stale = sorted(n for n in (old or ()) if n not in new and pattern.fullmatch(n))
        _write_synced(self.marker, json.dumps(self._stale).encode(), None)
        fsync_directory(self.out.parent)  # the shards' names before the index's
        return written

    def commit(self) -> None:
        """The commit point: the prepared index replaces the previous one in one step."""
        try:
            os.replace(self._index_tmp, self.out)
        except OSError as exc:
            raise OutputError(self.out, f"cannot rename into place ({exc.strerror})") from None
        self.committed = True
        fsync_directory(self.out.parent)

    def _ensure_placeholder(self) -> int:
        path = self.out.parent / placeholder_name(self.out)
        if os.path.lexists(path):
            return 0
        tmp = Path(f"{self.marker}-placeholder")
        size = _write_synced(tmp, placeholder_bytes(), self)
        try:
            os.link(tmp, path)  # never replaces a file another index may still need
            self.created.append(path)
        except FileExistsError:
            pass
        os.unlink(tmp)
        return size

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            with signals_held():  # a second SIGTERM must not cut the removal short
                for path in reversed(self.created):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            return
        # The new output is in place; tidying up is best effort (the next run finishes it).
        with contextlib.suppress(OSError):
            retire(self.out, self._stale)
            os.unlink(self.marker)  # no fsync: a removal lost in a crash is redone next run


def _write_synced(path: Path, data: bytes, owner: ShardedOutput | None) -> int:
    """Write `data` to `path` (created here when `owner` records it), fsync, return its size."""
    if owner is not None:
        owner._create(path)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0))
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


@cache
def shard_pattern(base: str) -> re.Pattern[str]:
    """The names of index `base`'s shards, Keras' own and wavg's (``.wavg-<token>``)."""
    return re.compile(rf"{re.escape(base)}_\d{{5}}(\.wavg-[0-9a-f]{{8}})?\.weights\.h5")


def own_pattern(base: str) -> re.Pattern[str]:
    """The names wavg gives index `base`'s shards; group 1 is the writing run's token."""
    return re.compile(rf"{re.escape(base)}_\d{{5}}\.wavg-([0-9a-f]{{8}})\.weights\.h5")


def index_names(out: Path) -> set[str] | None:
    """The shard names the index at `out` names: empty if there is none, None if unreadable."""
    try:
        with open(out, "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        return set()
    except OSError:
        return None
    if len(data) > MAX_INDEX_BYTES:
        return None
    try:
        return set(parse_index(data, str(out)).shards)
    except CheckpointError:
        return None


def names_in_use(out: Path) -> set[str] | None:
    """Every shard name that an index in `out`'s folder names (`out`'s own included), or
    None if `out`'s index cannot be read. Shards live beside their index, so this covers the
    shards of every input in this folder, and of an index copied or renamed there."""
    used = index_names(out)
    if used is None:
        return None
    for entry in os.listdir(out.parent):
        path = out.parent / entry
        if entry == out.name or not entry.endswith(".json") or not path.is_file():
            continue
        used |= index_names(path) or set()
    return used


def retire(out: Path, names: list[str]) -> None:
    """Remove shards the previous output needed and no index in the folder names now; its
    ``<base>_00000.weights.h5`` becomes the placeholder instead (Keras' loader opens it)."""
    used = names_in_use(out)
    if used is None:
        return
    for name in names:
        if name in used:
            continue
        if name == placeholder_name(out):
            _replace_with_placeholder(out)
        else:
            _unlink(out.parent / name)


def clean_sharded_leftovers(out: Path) -> None:
    """Finish or undo what killed runs for `out` left: their marker names them.

    A killed run's marker (``.<name>.wavg-tmp-<pid>-<token>``, its process gone) gives its
    token, so its unfinished shards are known, and lists the previous output's shards it
    made stale if it got as far as its commit. Neither kind is removed while an index in
    the folder names it. Markers are read before the indexes: a shard whose run committed
    in between is then named by the index that is read.
    """
    directory = out.parent
    marker = re.compile(rf"\.{re.escape(out.name)}{re.escape(TMP_MARKER)}(\d+)-([0-9a-f]+)")
    dead = [
        (entry, found.group(2))
        for entry in os.listdir(directory)
        if (found := marker.fullmatch(entry)) and not process_alive(int(found.group(1)))
    ]
    if dead:
        used = names_in_use(out)
        if used is None:
            return  # an index we cannot read may need anything: leave everything
        own = own_pattern(keras_base(out.name))
        tokens = {token for _, token in dead}
        for entry in os.listdir(directory):
            found = own.fullmatch(entry)
            if found and found.group(1) in tokens and entry not in used:
                _unlink(directory / entry)
        for entry, _ in dead:
            retire(out, _stale_list(directory / entry))
            _unlink(directory / entry)
    remove_stale_temps(out)


def _replace_with_placeholder(out: Path) -> None:
    path = out.parent / placeholder_name(out)
    empty = placeholder_bytes()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_size == len(empty):
        return
    tmp = Path(f"{temp_prefix(out)}{os.getpid()}-{os.urandom(4).hex()}-placeholder")
    try:
        fd = os.open(tmp, _CREATE, 0o644)
        try:
            os.write(fd, empty)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _stale_list(marker: Path) -> list[str]:
    """The names a killed run's marker lists, if they are this output's shard names."""
    try:
        with open(marker, "rb") as f:
            data = json.loads(f.read(MAX_INDEX_BYTES))
    except (OSError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    pattern = shard_pattern(keras_base(marker.name.split(TMP_MARKER)[0][1:]))
    return [n for n in data if isinstance(n, str) and pattern.fullmatch(n)]


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            os.unlink(path)


# ---------------------------------------------------------------------------------------------
# folders


def check_output_folder(out: Path) -> None:
    """Fail before any input is read if `out` cannot become a model folder wavg may replace."""
    check_output_parent(out)
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise OutputError(out, "exists and is not a folder")
    names = set(os.listdir(out))
    if names and "config.json" not in names:
        raise OutputError(
            out, "exists and is not a Keras model folder (no config.json); wavg replaces only those"
        )


@contextlib.contextmanager
def folder_output(out: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `out`; on normal exit it becomes `out`.

    The caller writes and fsyncs every file in it. The swap is one
    ``renameat2(RENAME_EXCHANGE)`` where the file system offers it; elsewhere the previous
    folder is moved aside first, and a run killed between the two renames has it moved back
    by the next run.
    """
    check_output_folder(out)
    clean_folder_leftovers(out)
    tmp = Path(f"{temp_prefix(out)}{os.getpid()}-{os.urandom(4).hex()}")
    try:  # from before the folder exists: a signal just after creating it must remove it too
        try:
            os.mkdir(tmp, 0o755)
        except OSError as exc:
            raise OutputError(
                out, f"cannot create a folder in {out.parent} ({exc.strerror})"
            ) from None
        yield tmp
        _fsync_folders(tmp)
        try:
            if not os.path.lexists(out):
                os.rename(tmp, out)
            elif not _exchange(tmp, out):
                aside = Path(f"{tmp}-previous")
                os.rename(out, aside)
                os.rename(tmp, out)
                os.rename(aside, tmp)
        except OSError as exc:
            raise OutputError(out, f"cannot move into place ({exc.strerror})") from None
        fsync_directory(out.parent)
    finally:
        with signals_held():
            _unlink(tmp)  # the previous folder after a swap, or the unfinished new one


def clean_folder_leftovers(out: Path) -> None:
    """Put back a previous folder moved aside by a killed run; remove killed runs' folders."""
    prefix = f".{out.name}{TMP_MARKER}"
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)-[0-9a-f]+(-previous)?")
    for entry in sorted(os.listdir(out.parent), key=lambda e: not e.endswith("-previous")):
        found = pattern.fullmatch(entry)
        if not found or process_alive(int(found.group(1))):
            continue
        path = out.parent / entry
        if found.group(2) and not os.path.lexists(out):
            with contextlib.suppress(OSError):
                os.rename(path, out)
                continue
        _unlink(path)


def _fsync_folders(root: Path) -> None:
    for directory, _, _ in os.walk(root):
        fsync_directory(Path(directory))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where that is not offered."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))
