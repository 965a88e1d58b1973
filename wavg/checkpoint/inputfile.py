"""One input file on disk: opened read-only, identified, watched for changes.

Inputs are never opened for writing. A checkpoint that a training job is still writing must
not be averaged half-written, so the file's identity (device, inode, size, mtime) is taken
when it is first opened and compared whenever it is reopened and once more at the end.
With many inputs (1000 files is a supported case) descriptors are not all kept open: the
caller decides with `keep_open`, and a closed file is reopened for each read.

This is the only module that touches an input's descriptor: every byte wavg reads from an
input goes through the methods below, so another byte source (remote storage, say) is a
class with the same contract, and the formats and the averaging core never learn where
their bytes came from. The contract of a byte source:

- attributes `path` (what errors name), `size` (bytes), `keep_open` (a hint: False when
  many inputs are open and resources should be given back between reads);
- `read_at(offset, size) -> bytes`, `readinto(offset, buffer)` and `readv(offset, buffers)`
  read exactly the bytes asked for (consecutive bytes from `offset`, in the order of
  `buffers` for `readv`), or raise `CheckpointError` (``truncated``, a read error) naming
  the file; all are safe to call from several threads at once;
- `copy_to(dst_fd, offset, count, dst_offset)` writes bytes of the input into an output
  file (in the kernel where it can);
- `check_unchanged()` raises `InputChanged` when the source is no longer what was first
  read, `release()` gives back resources (the next read reacquires and re-identifies).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from wavg.errors import CheckpointError, InputChanged

Buffer = Any  # a writable object with the buffer protocol (bytearray, memoryview, ndarray)
# Linux's limit on the buffers of one preadv.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


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
            data = self._call(os.pread, fd, size, offset)
        if len(data) != size:
            raise CheckpointError(self.path, "truncated")
        return data

    def readinto(self, offset: int, buffer: Buffer) -> None:
        """Fill `buffer` (any writable buffer, e.g. a numpy array) with the bytes at `offset`;
        straight into it (no copy), the GIL released."""
        self.readv(offset, [memoryview(buffer).cast("B")])

    def readv(self, offset: int, buffers: Sequence[Buffer]) -> None:
        """Fill `buffers` in order with the consecutive bytes at `offset`: one vectored read
        (``preadv``) for a span of many tensors, gaps between them landing in scratch."""
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if len(v)]
        with self.fd() as fd:
            while views:
                got = self._call(os.preadv, fd, views[:IOV_MAX], offset)
                if got == 0:
                    raise CheckpointError(self.path, "truncated")
                offset += got
                while views and got >= len(views[0]):
                    got -= len(views[0])
                    views.pop(0)
                if got:
                    views[0] = views[0][got:]

    def copy_to(self, dst_fd: int, offset: int, count: int, dst_offset: int) -> None:
        """Write `count` bytes of this input at `offset` into `dst_fd` at `dst_offset`; in
        the kernel (``copy_file_range``) where the platform allows it."""
        with self.fd() as src_fd:
            while count > 0:
                try:
                    done = os.copy_file_range(src_fd, dst_fd, count, offset, dst_offset)
                except (AttributeError, OSError):
                    data = self._call(os.pread, src_fd, min(count, 1 << 20), offset)
                    done = os.pwrite(dst_fd, data, dst_offset) if data else 0
                if done <= 0:
                    raise CheckpointError(self.path, "truncated while copying")
                offset, dst_offset, count = offset + done, dst_offset + done, count - done

    def _call(self, read, *args):  # noqa: ANN001, ANN202 - os.pread / os.preadv
        try:
            return read(*args)
        except OSError as exc:
            raise CheckpointError(
                self.path, f"read error ({os.strerror(exc.errno or errno.EIO)})"
            ) from None

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
