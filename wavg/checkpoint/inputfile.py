"""One input file on disk: opened read-only, identified, watched for changes.

Inputs are never opened for writing. A checkpoint that a training job is still writing must
not be averaged half-written, so the file's identity (device, inode, size, mtime) is taken
when it is first opened and compared whenever it is reopened and once more at the end.
With many inputs (1000 files is a supported case) descriptors are not all kept open: the
caller decides with `keep_open`, and a closed file is reopened for each read.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from wavg.errors import CheckpointError, InputChanged


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class InputFile:
    """A regular file opened read-only, with its identity recorded at first open."""

    def __init__(self, path: str) -> None:
        self.path = path
        fd = self._open()
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise CheckpointError(path, "is a directory, not a checkpoint file")
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(path, "is not a regular file")
            if st.st_size == 0:
                raise CheckpointError(path, "is empty")
        except BaseException:
            os.close(fd)
            raise
        self.identity = _identity(st)
        self.size = st.st_size
        self._fd: int | None = fd
        self._lock = threading.Lock()
        self.keep_open = True

    def _open(self) -> int:
        try:
            # O_NONBLOCK: opening a FIFO must not hang waiting for a writer.
            return os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CheckpointError(self.path, "no such file") from None
        except IsADirectoryError:
            raise CheckpointError(self.path, "is a directory, not a checkpoint file") from None
        except PermissionError:
            raise CheckpointError(self.path, "permission denied") from None
        except OSError as exc:
            raise CheckpointError(
                self.path, f"cannot open ({os.strerror(exc.errno or errno.EIO)})"
            ) from None

    @contextmanager
    def fd(self) -> Iterator[int]:
        """A descriptor for the file; safe to use from several threads at once.

        With `keep_open` one descriptor is shared (positional reads need no seek); without
        it each use opens a private one, re-identified, and closes it afterwards.
        """
        if self.keep_open:
            with self._lock:
                if self._fd is None:
                    self._fd = self._reopen()
                fd = self._fd
            yield fd
            return
        fd = self._reopen()
        try:
            yield fd
        finally:
            os.close(fd)

    def _reopen(self) -> int:
        try:
            fd = self._open()
        except CheckpointError:
            if not os.path.lexists(self.path):  # it was there when first opened
                raise InputChanged(self.path, "disappeared while it was being read") from None
            raise
        if _identity(os.fstat(fd)) != self.identity:
            os.close(fd)
            raise InputChanged(self.path, "changed while it was being read")
        return fd

    def read_at(self, offset: int, size: int) -> bytes:
        """Read exactly `size` bytes at `offset` (fewer means the file is truncated)."""
        with self.fd() as fd:
            data = os.pread(fd, size, offset)
        if len(data) != size:
            raise CheckpointError(self.path, "truncated")
        return data

    def release(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def check_unchanged(self) -> None:
        """Raise `InputChanged` if the file on disk is no longer the one that was read."""
        try:
            st = os.stat(self.path)
        except OSError:
            raise InputChanged(self.path, "disappeared while it was being read") from None
        if _identity(st) != self.identity:
            raise InputChanged(self.path, "changed while it was being read")

    def same_file(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == self.identity[:2]
