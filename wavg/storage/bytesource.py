"""The contract every input's bytes are read through: `InputSource` and `ByteSource`.

A format reads an input only through these methods, so it never learns whether the bytes
come from a local file (`wavg.storage.local.InputFile`) or an object in storage
(`wavg.storage.remote.RemoteFile`), and differences that matter are capability flags
resolved once, never class tests. This module defines the contract, never a source.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class InputSource(Protocol):
    """The files one checkpoint was read from, as the averaging core watches them.

    One byte source, several (a sharded index and its shards), or a directory a library
    reads itself (an Orbax step): whatever it is, the core only names it, counts what it
    fetched, lets it give back descriptors and checks at the end that nothing changed.
    """

    path: str
    """What every message names: a local path, or a URL with its secrets redacted."""

    keep_open: bool
    """Whether descriptors stay open between reads. Set False when too many inputs are open
    at once (`wavg.storage.descriptors`): each read then reopens, and re-identifies, its file."""

    bytes_fetched: int
    """Bytes fetched over a network so far (0 for local files), for the run's summary."""

    requests: int
    """Requests made to object storage so far (0 for local files)."""

    def check_unchanged(self) -> None:
        """Raise `InputChanged` if what is stored now is not what was opened (identity
        pinned at first open: inode, size and mtime, or an object's ETag/generation).
        Called once after the last read, so an input rewritten mid-run is never averaged."""

    def release(self) -> None:
        """Give back descriptors and caches; safe to call twice. The next read reopens and
        re-identifies, so a released source reads the same bytes or raises `InputChanged`."""


@runtime_checkable
class ByteSource(InputSource, Protocol):
    """One input file, read-only, read by ranges: what every single-file format reads.

    Guarantees shared by every source: reads are positional and thread-safe (two workers
    may read one source at once), never change the file, and come from the file pinned at
    open (a reopened file with another identity raises `InputChanged`). `OSError` from a
    ranged read propagates unchanged, so the format names the tensor being read; any other
    failure is a `CheckpointError` naming `path`.
    """

    size: int
    """The file's length in bytes, pinned at open (an empty file is refused at open)."""

    identity: Hashable
    """What must not change while the file is read; compared by `check_unchanged`."""

    file_key: Hashable
    """What names the stored bytes themselves: two sources with equal keys are one file
    opened under two names (a hard link), which a format of several files must refuse."""

    prefetches: bool
    """Whether `will_read` hints pay off: a remote source fetches the ranges ahead,
    concurrently; a local file leaves read-ahead to the kernel. A format works out ranges
    it would otherwise not need (chunk lists of compressed tensors) only when this is set."""

    links: bool
    """Whether a name beside this file may be a symbolic link (a local directory): a format
    that opens `sibling`s by name must then refuse one leading out of the folder. Object
    stores have no links."""

    def read_at(self, offset: int, size: int) -> bytes:
        """Exactly `size` bytes at `offset`; fewer is a `CheckpointError` ("truncated").
        For metadata: small, scattered reads (remote sources serve them from a page cache)."""

    def readinto(self, offset: int, buffer: memoryview) -> int:
        """Fill `buffer` with the bytes at `offset` and return how many there were (fewer
        than ``len(buffer)`` only at the end of the file). The hot path: one block of one
        tensor straight into the averaging buffer, no copy, the GIL released."""

    def readv(self, offset: int, buffers: Sequence) -> int:
        """Fill `buffers` in order with the consecutive bytes at `offset` and return how
        many there were (fewer only at the end of the file): a run of small tensors in one
        vectored read, the bytes between them landing in scratch buffers."""

    def will_read(self, ranges: Sequence[tuple[int, int]], readers: int = 1) -> None:
        """A hint, never a promise: ``(offset, size)`` ranges about to be read with
        `readinto`, in reading order, by one of `readers` inputs read in lockstep (so a
        source that fetches ahead shares one memory budget among them). Replaces the
        previous hint."""

    def cache_small_reads(self, ranges: Sequence[tuple[int, int]]) -> bool:
        """A hint, never a promise: ``(offset, size)`` ranges of small reads soon to come one
        after another, each chosen by what the previous one said (a parser walking a file's
        structure). A source that pays a round trip per read fetches them now, concurrently,
        into the cache its small reads are served from; a local file does nothing. False when
        the cache has no room for them (nothing was fetched): stop hinting."""

    def copy_range_to(self, dst_fd: int, src_at: int, dst_at: int, count: int) -> None:
        """Copy `count` bytes at `src_at` into the output descriptor `dst_fd` at `dst_at`
        (in the kernel when both are local); a short source is a `CheckpointError`."""

    def sibling(self, name: str) -> ByteSource:
        """The file called `name` beside this one (a shard beside its index), opened and
        pinned the same way. `name` is one plain path segment; the caller checks it (and,
        when `links` is set, that it is no link leading out of the folder)."""

    def h5py_source(self) -> str | io.BufferedReader:
        """What h5py should open to read this file: a local path for h5py's own driver, or
        a buffered file object over `readinto`."""
