"""Write a file so that its path only ever holds the old file or the complete new one.

The data goes to a temporary file in the output's own directory (so the final rename stays
on one file system), is fsynced, renamed over the output with ``os.replace`` and the
directory is fsynced so the new entry survives a crash. On any error or signal the temporary
files are removed; a run killed with SIGKILL leaves them named
``.<output>.wavg-tmp-<pid>-<token>``, and the next run for that output removes those whose
process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from wavg._runtime import signals_held
from wavg.errors import OutputError

TMP_MARKER = ".wavg-tmp-"
# Open flags that create a file only where none exists (never follow or reuse one).
CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def temp_prefix(out: Path) -> str:
    return str(out.parent / f".{out.name}{TMP_MARKER}")


def temp_name(out: Path) -> str:
    """A new temporary name beside `out` for this process: `temp_prefix`, the pid (what
    `remove_stale_temps` judges a killed run's leftovers by) and a random token."""
    return f"{temp_prefix(out)}{os.getpid()}-{os.urandom(4).hex()}"


def check_output_parent(out: Path) -> None:
    """Fail early, before any input is read, if `out`'s directory cannot receive it."""
    directory = out.parent
    if not directory.exists():
        raise OutputError(out, f"directory {directory} does not exist")
    if not directory.is_dir():
        raise OutputError(out, f"{directory} is not a directory")


def check_output_dir(out: Path) -> None:
    """Fail early, before any input is read, if `out` cannot be a file we create."""
    check_output_parent(out)
    if out.is_dir():
        raise OutputError(out, "is a directory")
    if out.exists() and not out.is_file():
        raise OutputError(out, "exists and is not a regular file")


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[str]:
    """Yield a temporary path next to `out`; on normal exit it replaces `out` atomically.

    The caller writes the temporary file completely and fsyncs it before leaving the block.
    Every file whose name starts with the yielded path is removed if the block fails.
    """
    check_output_dir(out)
    remove_stale_temps(out)
    tmp = temp_name(out)
    # Created inside the try: a signal handled just after the file appears (SIGTERM raises
    # in the next bytecode) must still reach the cleanup below.
    try:
        try:
            fd = os.open(tmp, CREATE_NEW, 0o644)
        except OSError as exc:
            raise OutputError(
                out, f"cannot create a file in {out.parent} ({exc.strerror})"
            ) from None
        os.close(fd)
        yield tmp
        try:
            os.replace(tmp, out)
        except OSError as exc:
            raise OutputError(out, f"cannot rename into place ({exc.strerror})") from None
        fsync_directory(out.parent)
    finally:
        with signals_held():  # a second SIGTERM must not cut the cleanup short
            for leftover in glob.glob(glob.escape(tmp) + "*"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (without this the new entry can be lost)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems refuse it
            raise
    finally:
        os.close(fd)


def remove_stale_temps(out: Path, keep: Callable[[str], object] | None = None) -> list[str]:
    """Remove temporary files that a killed run for `out` left behind; return their names.
    A name `keep` accepts is left alone (a commit protocol's marker, judged by its own rule)."""
    removed = []
    prefix = temp_prefix(out)
    for path in glob.glob(glob.escape(prefix) + "*"):
        if keep is not None and keep(os.path.basename(path)):
            continue
        pid_text = path[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not process_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether `pid` may still be running (this process counts; another user's does too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
