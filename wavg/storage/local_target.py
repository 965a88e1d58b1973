"""An output's place on a local disk, as a commit protocol's target: its folder's files by name.

Every write is whole or absent (a temporary file beside it, fsynced, then renamed or linked:
a link never replaces a file); a new folder is swapped in by one ``renameat2(RENAME_EXCHANGE)``
where the kernel offers it. This module knows no format: which file is the commit point, and
what may be deleted, is the protocol's to say.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from wavg._runtime import signals_held
from wavg.errors import OutputError
from wavg.storage.atomic import (
    CREATE_NEW,
    TMP_MARKER,
    check_output_dir,
    check_output_parent,
    fsync_directory,
    process_alive,
    remove_stale_temps,
    temp_name,
)


class LocalTarget:
    """The output `out` and the files beside it in its directory."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.name = out.name
        self.display = str(out)
        self.folder = out.parent

    # -- files beside the output -----------------------------------------------------------

    def check_file(self) -> None:
        """Fail before any input is read if the output cannot be a file created here."""
        check_output_dir(self.out)

    def entries(self) -> dict[str, int | None]:
        """Name -> size of the entries in the output's folder (None: not a regular file)."""
        found: dict[str, int | None] = {}
        for entry in os.listdir(self.folder):
            try:
                st = os.lstat(self.folder / entry)
            except OSError:
                continue
            found[entry] = st.st_size if stat.S_ISREG(st.st_mode) else None
        return found

    def read(self, name: str, limit: int) -> bytes | None:
        """A small file's bytes; empty if it is missing, None if unreadable or over `limit`."""
        try:
            with open(self.folder / name, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return b""
        except OSError:
            return None
        return data if len(data) <= limit else None

    def create(self, name: str) -> Path:
        """Create the empty file `name` (`FileExistsError` if there is one) for the caller to
        write and fsync; it is in place as it is written."""
        path = self.folder / name
        try:
            os.close(os.open(path, CREATE_NEW, 0o644))
        except FileExistsError:
            raise
        except OSError as exc:
            raise self._cannot_create(exc) from None
        return path

    def publish(self, name: str) -> None:
        """Nothing to do: a created file is already in place (`sync` makes its name durable)."""

    def put(self, name: str, data: bytes, new: bool = False) -> bool:
        """Write `name` whole, replacing any file of that name; with `new`, only if there is
        none (False then). The commit point of an output is such a put."""
        # Named for this process, like `atomic_output`'s: a killed run's is removed by the next.
        tmp = temp_name(self.out)
        try:  # from before the file exists: a signal just after creating it must remove it
            try:
                fd = os.open(tmp, CREATE_NEW, 0o644)
            except OSError as exc:
                raise self._cannot_create(exc) from None
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                if new:
                    os.link(tmp, self.folder / name)  # never replaces a file
                else:
                    os.replace(tmp, self.folder / name)
            except FileExistsError:
                return False
            except OSError as exc:
                raise OutputError(
                    self.display, f"cannot rename into place ({exc.strerror})"
                ) from None
            return True
        finally:
            with signals_held(), contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_file(self, name: str, source: str) -> None:
        """Rename the created file `source` over `name` (one step: whole or absent)."""
        try:
            os.replace(self.folder / source, self.folder / name)
        except OSError as exc:
            raise OutputError(self.display, f"cannot rename into place ({exc.strerror})") from None

    def delete(self, name: str) -> None:
        """Best effort: a file left is found again by the next run."""
        with contextlib.suppress(OSError):
            os.unlink(self.folder / name)

    def sync(self) -> None:
        """Make the names created or renamed in the folder durable."""
        fsync_directory(self.folder)

    def remove_dead_temps(self, keep: Callable[[str], object]) -> None:
        """Remove the temporary files of killed runs for this output, but those `keep` names."""
        remove_stale_temps(self.out, keep)

    # -- the output as a folder ------------------------------------------------------------

    def folder_names(self) -> list[str] | None:
        """The names in the output folder; None if there is none. Refuses a non-folder."""
        check_output_parent(self.out)
        if not os.path.lexists(self.out):
            return None
        if not self.out.is_dir():
            raise OutputError(self.display, "exists and is not a folder")
        return os.listdir(self.out)

    @contextlib.contextmanager
    def new_folder(
        self, check: Callable[[list[str] | None], None], last: Sequence[str], kind: str
    ) -> Iterator[Path]:
        """Yield an empty temporary folder next to the output; on normal exit it becomes it.

        The caller writes and fsyncs every file in it (`last`, which a remote folder uploads
        last, needs no order here). The swap is one ``renameat2(RENAME_EXCHANGE)`` where the
        file system offers it; elsewhere the previous folder is moved aside first, and a run
        killed between the two renames has it moved back by the next run.
        """
        out = self.out
        check(self.folder_names())
        clean_folder_leftovers(out)
        tmp = Path(temp_name(out))
        try:  # from before the folder exists: a signal just after creating it must remove it
            try:
                os.mkdir(tmp, 0o755)
            except OSError as exc:
                raise OutputError(
                    out, f"cannot create a {kind} in {out.parent} ({exc.strerror})"
                ) from None
            yield tmp
            for directory, _, _ in os.walk(tmp):
                fsync_directory(Path(directory))
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
                _remove(tmp)  # the previous folder after a swap, or the unfinished new one

    def _cannot_create(self, exc: OSError) -> OutputError:
        return OutputError(self.display, f"cannot create a file in {self.folder} ({exc.strerror})")


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
        _remove(path)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            os.unlink(path)


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
