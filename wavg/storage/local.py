"""One input file on disk: opened read-only, identified, watched for changes.

Inputs are never opened for writing. A checkpoint that a training job is still writing must
not be averaged half-written, so the file's identity (device, inode, size, mtime) is taken
when it is first opened and compared whenever it is reopened and once more at the end.
With many inputs (1000 files is a supported case) descriptors are not all kept open: the
caller decides with `keep_open`, and a closed file is reopened for each read.

Every byte wavg reads from an input goes through the methods of the `ByteSource` contract
(wavg.storage.bytesource), never a raw descriptor outside this module; wavg.storage.remote
is the other source. Formats and the averaging core never learn where the bytes came from.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from wavg.errors import CheckpointError, InputChanged
from wavg.storage.bytesource import ByteSource

# Linux's limit on the buffers of one preadv.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class InputFile:
    """A regular file opened read-only, with its identity recorded at first open: a
    `ByteSource` whose reads are ``pread``/``preadv`` on one shared descriptor."""

    prefetches = False  # the kernel reads ahead
    links = True  # a name beside it may be a symlink

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
        self.file_key = self.identity[:2]  # (device, inode): one file under any name
        # What other machines see of the same version (a shared file system's device and
        # inode numbers differ between clients): its size and mtime.
        self.version = self.identity[2:]
        # Counted by byte sources that fetch over a network; a local file fetches nothing.
        self.bytes_fetched = 0
        self.requests = 0

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

    def readinto(self, offset: int, buffer: memoryview) -> int:
        """Fill `buffer` with the bytes at `offset`; returns how many there were (fewer than
        ``len(buffer)`` only at the end of the file). `OSError` propagates."""
        done = 0
        with self.fd() as fd:
            while done < len(buffer):
                got = os.preadv(fd, [buffer[done:]], offset + done)
                if got == 0:
                    break
                done += got
        return done

    def readv(self, offset: int, buffers: Sequence) -> int:
        """Fill `buffers` in order with the consecutive bytes at `offset` (one ``preadv``: a
        span of many small tensors, the headers between them landing in scratch); returns
        how many bytes there were (fewer only at the end of the file). `OSError` propagates."""
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if len(v)]
        done = 0
        with self.fd() as fd:
            while views:
                got = os.preadv(fd, views[:IOV_MAX], offset + done)
                if got == 0:
                    break
                done += got
                while views and got >= len(views[0]):
                    got -= len(views[0])
                    views.pop(0)
                if got:
                    views[0] = views[0][got:]
        return done

    def will_read(self, ranges: Sequence[tuple[int, int]], readers: int = 1) -> None:
        """A hint: ``(offset, size)`` ranges about to be read with `readinto`, in order, by
        one of `readers` inputs read in lockstep. A local file leaves read-ahead to the kernel."""

    def cache_small_reads(self, ranges: Sequence[tuple[int, int]]) -> bool:
        """A hint: nothing to do, a local read costs no round trip (True: nothing to wait for)."""

    def copy_range_to(self, dst_fd: int, src_at: int, dst_at: int, count: int) -> None:
        """Copy `count` bytes at `src_at` to `dst_fd` at `dst_at`, in the kernel if it can."""
        with self.fd() as src_fd:
            while count > 0:
                try:
                    done = os.copy_file_range(src_fd, dst_fd, count, src_at, dst_at)
                except (AttributeError, OSError):
                    data = os.pread(src_fd, min(count, 1 << 20), src_at)
                    done = os.pwrite(dst_fd, data, dst_at) if data else 0
                if done <= 0:
                    raise CheckpointError(self.path, "truncated while copying")
                src_at, dst_at, count = src_at + done, dst_at + done, count - done

    def sibling(self, name: str) -> InputFile:
        """The file called `name` next to this one (a shard beside its index), opened and
        identified the same way. `name` is one path segment; the caller checks it."""
        return InputFile(str(Path(self.path).parent / name))

    def h5py_source(self) -> str | io.BufferedReader:
        """What h5py should open to read this file: its path, for h5py's own driver."""
        return self.path

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


class Window(io.RawIOBase):
    """A read-only, seekable file object over bytes ``start … start+size`` of a byte source:
    how zipfile and h5py read an input."""

    def __init__(self, file: ByteSource, start: int, size: int) -> None:
        self._file, self._start, self._size, self._pos = file, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        want = max(0, min(len(buffer), self._size - self._pos))
        if want == 0:
            return 0
        got = self._file.readinto(self._start + self._pos, memoryview(buffer).cast("B")[:want])
        self._pos += got
        return got
