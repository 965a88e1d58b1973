"""Checkpoints in object storage (s3://, gs://, any fsspec URL) as byte sources like `InputFile`.

`open_url` says what a URL names, asking the backend once: an object (a `RemoteFile`) or a
prefix of objects (a `RemotePrefix`, listed); what either holds is the formats' business. A
`RemoteFile` pins the object's size and ETag/generation at open, serves small reads (zip
and HDF5 metadata) from a page cache, and fetches the ranges it is told will be read
(`will_read`) ahead of the reader: coalesced, in chunks, several at once, within one memory
budget shared by every input. Averaging never downloads a whole object and never writes to
an input; `download` (for evaluate) and `upload` (for outputs) are the only whole-object
transfers. fsspec and its backends are imported only here, and only when a URL is met.
"""

from __future__ import annotations

import bisect
import errno
import heapq
import io
import itertools
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from wavg._runtime import signals_held
from wavg.errors import CheckpointError, InputChanged, OutputError, UsageError, WavgError
from wavg.storage.local import Window
from wavg.storage.locations import Url, identity_key, redact

PAGE = 128 << 10  # metadata reads are served from pages of this size
SMALL_READ = 4 * PAGE  # reads up to this size go through the page cache
MAX_PAGES = 256  # per input: 32 MiB of cached metadata at most
GAP = 64 << 10  # planned ranges closer than this are fetched as one
CHUNK = 32 << 20  # largest single prefetch request (a request costs latency, not bytes)
MIN_CHUNK = 256 << 10
BUDGET = 128 << 20  # bytes held for reads ahead, over all inputs (see `_Prefetcher`)
# A chunk being fetched is held twice: the client collects the response body in pieces and
# joins them into one bytes object, so until the join is done both are in memory.
HELD_WHILE_FETCHING = 2
FETCHERS = 64  # concurrent requests, unless WAVG_MAX_REQUESTS says otherwise
MAX_REQUESTS_ENV = "WAVG_MAX_REQUESTS"
ATTEMPTS = 4  # tries per request for transient errors (the backend may retry inside each)
BACKOFF_SECONDS = 0.5  # doubled after each failed try

_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_BUCKETED = ("s3", "s3a", "gs", "gcs")
_UNREACHABLE = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
)
_BROKEN = ("HTTPClientError", "ResponseParserError", "IncompleteRead", "ClientPayloadError")
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_TRANSIENT_ERRNOS = {
    getattr(errno, "EREMOTEIO", 121),
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.EAGAIN,
}

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# errors: one line, no secrets


def scrub(text: object) -> str:
    """A backend's message made safe to show: one line, short, without URL user info, query
    strings or the values of credential variables in the environment."""
    line = " ".join(str(text).split())
    line = re.sub(r"([A-Za-z][A-Za-z0-9+.-]+://)[^/\s@]+@", r"\1***@", line)
    line = re.sub(r"\?[^\s'\"]+", "?***", line)
    for var in _SECRET_ENV:
        value = os.environ.get(var, "")
        if len(value) >= 4:
            line = line.replace(value, "***")
    return line[:200] or "unknown error"


def _changed(exc: BaseException) -> bool:
    if type(exc).__name__ == "FileExpired":
        return True
    return isinstance(exc, OSError) and exc.errno == errno.EINVAL and "condition" in str(exc)


def describe(exc: BaseException) -> tuple[str, bool]:
    """``(problem, transient)`` for an exception from a storage backend."""
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return ("no such bucket" if "bucket" in str(exc).lower() else "no such object"), False
    if isinstance(exc, PermissionError):
        return "access denied (check the credentials the backend found)", False
    if name in _NO_CREDENTIALS:
        return (
            "no credentials found (wavg uses the backend's standard chain: environment, "
            "config files, instance metadata)"
        ), False
    if name in _UNREACHABLE or isinstance(exc, ConnectionError | TimeoutError):
        return "cannot reach the storage endpoint", True
    if name in _BROKEN:
        return f"the connection to the storage endpoint broke ({scrub(exc)})", True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return f"storage service error ({scrub(exc.strerror or exc)})", True
    if name == "NotADirectoryError" or isinstance(exc, IsADirectoryError):
        return "is a directory (a prefix), not a checkpoint", False
    return f"{name}: {scrub(exc)}", False


def _retrying(call: Callable[[], T], display: str, error: type[WavgError] = CheckpointError) -> T:
    """`call()`, retried with backoff on transient errors; a failure becomes one `error`
    naming `display` (an `InputChanged` if the object changed under a conditional read)."""
    delay = BACKOFF_SECONDS
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except WavgError:
            raise
        except Exception as exc:
            if _changed(exc):
                raise InputChanged(display, "changed while it was being read") from None
            problem, transient = describe(exc)
            if not transient or attempt == ATTEMPTS - 1:
                tries = f" after {ATTEMPTS} tries" if transient else ""
                raise error(display, f"{problem}{tries}") from None
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# filesystems


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and the object's path within it for `url`.

    A missing fsspec or backend is a `UsageError` (exit 2) with the pip command to run; a URL
    fsspec cannot parse is a `CheckpointError` naming it (redacted).
    """
    display = redact(url)
    protocol = url.split("://", 1)[0].lower()
    extra = f".[{_EXTRAS.get(protocol, 'remote')}]"  # in wavg's source folder: not on PyPI
    try:
        from fsspec.core import url_to_fs
        from fsspec.registry import known_implementations
    except ImportError:
        raise UsageError(
            f"{display}: reading URLs needs fsspec: pip install '{extra}' in wavg's source folder"
        ) from None
    options = _options(protocol)
    try:
        fs, path = url_to_fs(url, **options)
    except ImportError:
        package = re.search(
            r"[Ii]nstall (\S+)", known_implementations.get(protocol, {}).get("err", "")
        )
        hint = (
            f"pip install '{extra}' in wavg's source folder"
            if protocol in _EXTRAS or not package
            else f"pip install {package[1]}"
        )
        problem = f"{protocol}:// needs a backend that is not installed: {hint}"
        raise UsageError(f"{display}: {problem}") from None
    except Exception as exc:
        raise CheckpointError(display, f"not a usable URL ({scrub(exc)})") from None
    if protocol in _BUCKETED and "/" not in path.strip("/"):
        raise CheckpointError(display, f"not an object URL (expected {protocol}://bucket/key)")
    return fs, path


def _options(protocol: str) -> dict[str, Any]:
    """Backend options: S3's client keeps 10 connections unless told more, which would cap
    the requests in flight below `requests_in_flight`."""
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"max_pool_connections": requests_in_flight()}}
    return {}


def _bucket_missing(fs: Any, path: str) -> bool:
    bucket = path.strip("/").split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError:
        return True
    except Exception:
        return False
    return False


def _identity(info: dict) -> tuple:
    """What must not change while an object is read: its size and version marker."""
    for key in ("ETag", "etag", "generation", "md5Hash", "VersionId"):
        if info.get(key):
            return (info.get("size"), key, str(info[key]).strip('"'))
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return (info.get("size"), key, str(info[key]))
    return (info.get("size"),)


def requests_in_flight() -> int:
    """How many requests to object storage a run keeps in flight at most: prefetches, and
    inputs opened at once. `FETCHERS` unless the environment variable ``WAVG_MAX_REQUESTS``
    gives another positive number (a slow or rate-limited endpoint may want fewer)."""
    value = os.environ.get(MAX_REQUESTS_ENV, "").strip()
    if not value:
        return FETCHERS
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"{MAX_REQUESTS_ENV}={value!r}: expected a positive whole number")
    return int(value)


def glob_urls(pattern: str) -> list[str]:
    """The URLs matching a glob `pattern` on its backend, sorted: objects, and prefixes
    (which may be model folders, as a local glob matches folders too)."""
    fs, path = filesystem(pattern)
    display = redact(pattern)
    found = _retrying(lambda: fs.glob(path), display)
    return sorted(fs.unstrip_protocol(p.rstrip("/")) for p in found)


# ---------------------------------------------------------------------------------------------
# prefetching, shared by every input


PENDING, FETCHING, READY, DROPPED = range(4)


class _Chunk:
    """One planned request: bytes ``start … end`` of one input, the planned `spans` in it
    (the gaps between them are fetched but never counted as read), and how many planned
    bytes the reader has taken so far."""

    __slots__ = ("start", "end", "spans", "useful", "consumed", "data", "state", "error", "key")

    def __init__(self, start: int, end: int, spans: list[tuple[int, int]], key: tuple) -> None:
        self.start, self.end, self.spans, self.key = start, end, spans, key
        self.useful = sum(b - a for a, b in spans)
        self.consumed = 0
        self.data: bytes | None = None
        self.state = PENDING
        self.error: BaseException | None = None

    @property
    def size(self) -> int:
        return self.end - self.start

    def planned(self, first: int, last: int) -> int:
        """How many planned bytes lie in ``first … last``."""
        return sum(max(0, min(b, last) - max(a, first)) for a, b in self.spans)


class _Prefetcher:
    """Fetches planned chunks of all inputs in the order the reader will want them.

    The order key is (position in the reader's plan, offset in that range, input): the
    averaging core reads one block of every input before the next block. `used` counts the
    bytes actually held: a chunk in flight `HELD_WHILE_FETCHING` times its size, a fetched
    one once, until the reader has taken all of it. Prefetching keeps `used` within
    `BUDGET`; a reader that needs a chunk nobody fetched yet fetches it itself, so a full
    budget slows prefetching down but never blocks a read.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.heap: list[tuple[tuple, int, RemoteFile, _Chunk]] = []
        self.used = 0
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []

    def submit(self, file: RemoteFile, chunks: list[_Chunk]) -> None:
        with self.cond:
            for chunk in chunks:
                heapq.heappush(self.heap, (chunk.key, next(self._seq), file, chunk))
            # Held signals: one raised while `Thread.start` waits breaks threading's books.
            with signals_held():
                while len(self._threads) < requests_in_flight():
                    thread = threading.Thread(target=self._work, name="wavg-fetch", daemon=True)
                    thread.start()
                    self._threads.append(thread)
            self.cond.notify_all()

    def _work(self) -> None:
        while True:
            with self.cond:
                while True:
                    while self.heap and self.heap[0][3].state != PENDING:
                        heapq.heappop(self.heap)
                    if self.heap and (
                        self.used == 0
                        or self.used + self.heap[0][3].size * HELD_WHILE_FETCHING <= BUDGET
                    ):
                        _, _, file, chunk = heapq.heappop(self.heap)
                        chunk.state = FETCHING
                        self.used += chunk.size * HELD_WHILE_FETCHING
                        break
                    self.cond.wait()
            self.fill(file, chunk)

    def fill(self, file: RemoteFile, chunk: _Chunk) -> None:
        """Fetch a chunk this thread has claimed (state FETCHING, counted in `used`)."""
        data, error = None, None
        try:
            data = file.fetch(chunk.start, chunk.end)
        except BaseException as exc:  # handed to the reader, who raises it
            error = exc
        with self.cond:
            if chunk.state == DROPPED:  # its input was closed meanwhile
                self.used -= chunk.size * HELD_WHILE_FETCHING
            else:
                self.used -= chunk.size * (HELD_WHILE_FETCHING - 1)  # joined: held once
                chunk.data, chunk.error, chunk.state = data, error, READY
            self.cond.notify_all()

    def take(self, file: RemoteFile, chunk: _Chunk, at: int, view: memoryview) -> bool:
        """Copy bytes at `at` of `chunk` into `view`; False if the chunk is gone (read it
        directly then)."""
        with self.cond:
            mine = chunk.state == PENDING
            if mine:
                chunk.state = FETCHING
                self.used += chunk.size * HELD_WHILE_FETCHING
            while chunk.state == FETCHING and not mine:
                self.cond.wait()
        if mine:
            self.fill(file, chunk)
        with self.cond:
            if chunk.state != READY:
                return False
            if chunk.error is not None:
                raise chunk.error
            assert chunk.data is not None
            view[:] = memoryview(chunk.data)[at - chunk.start : at - chunk.start + len(view)]
            chunk.consumed += chunk.planned(at, at + len(view))
            if chunk.consumed >= chunk.useful:
                self._drop(chunk)
        return True

    def _drop(self, chunk: _Chunk) -> None:
        if chunk.state == READY:
            self.used -= chunk.size
        chunk.data, chunk.state = None, DROPPED
        self.cond.notify_all()

    def forget(self, chunks: Sequence[_Chunk]) -> None:
        with self.cond:
            for chunk in chunks:
                if chunk.state in (PENDING, READY):
                    self._drop(chunk)
                elif chunk.state == FETCHING:
                    chunk.state = DROPPED  # `fill` gives its budget back


_prefetcher = _Prefetcher()


def plan_chunks(ranges: Sequence[tuple[int, int]], seq: int, chunk: int = CHUNK) -> list[_Chunk]:
    """Coalesce ``(offset, size)`` ranges (given in reading order) into chunks of at most
    `chunk` bytes, each keyed by where the reader first needs it."""
    order = sorted((off, off + size, i) for i, (off, size) in enumerate(ranges) if size > 0)
    groups: list[list[tuple[int, int, int]]] = []
    for item in order:
        if groups and item[0] <= groups[-1][-1][1] + GAP:
            groups[-1].append(item)
        else:
            groups.append([item])
    chunks: list[_Chunk] = []
    for group in groups:
        start, end = group[0][0], max(last for _, last, _ in group)
        for piece in range(start, end, chunk):
            piece_end = min(piece + chunk, end)
            inside = [
                (max(a, piece), min(b, piece_end), i)
                for a, b, i in group
                if a < piece_end and b > piece
            ]
            if not inside:
                continue
            spans = [(a, b) for a, b, _ in inside]
            first = min(inside, key=lambda r: (r[2], r[0]))
            offset_in_range = first[0] - ranges[first[2]][0]
            chunks.append(_Chunk(piece, piece_end, spans, (first[2], offset_in_range, seq)))
    return chunks


# ---------------------------------------------------------------------------------------------
# the byte source


_file_seq = itertools.count()


class _Probe:
    """One look at what a URL names, retried: an object (opened, with its info) or a prefix.

    Backends say "a prefix" either by an info of type directory or by refusing to open it
    as a file; both are answers here, not errors.
    """

    def __init__(self, url: str) -> None:
        self.fs, self.key = filesystem(url)
        self.requests = 0
        display = redact(url)

        def attempt() -> tuple[Any, dict]:
            self.fs.invalidate_cache(self.key)
            self.requests += 1
            try:
                handle = self.fs.open(self.key, "rb", cache_type="none")
            except (IsADirectoryError, NotADirectoryError):
                return None, {"type": "directory"}
            info = getattr(handle, "details", None)
            if not info:
                self.requests += 1
                info = self.fs.info(self.key)
            return handle, info

        try:
            self.handle, self.info = _retrying(attempt, display)
        except CheckpointError as exc:
            if exc.problem == "no such object" and _bucket_missing(self.fs, self.key):
                raise CheckpointError(display, "no such bucket") from None
            raise
        self.is_prefix = self.info.get("type") == "directory"


class RemotePrefix:
    """A URL that names a prefix (a "folder" of objects): the objects under it, listed once.

    `files` are their names relative to the prefix, sorted; sub-prefixes appear only through
    the objects in them, and a console's empty "folder" marker is no file.
    """

    def __init__(self, url: str) -> None:
        self.url = url.split("?", 1)[0].rstrip("/")
        self.path = redact(url)
        fs, key = filesystem(url)
        prefix = key.rstrip("/") + "/"

        def attempt() -> dict:
            fs.invalidate_cache(key)
            try:
                return fs.find(prefix, detail=True)
            except FileNotFoundError:
                return {}

        self.files = [
            name[len(prefix) :]
            for name, info in sorted(_retrying(attempt, self.path).items())
            if name.startswith(prefix)
            and info.get("type") != "directory"
            and len(name) > len(prefix)
            and not name.endswith("/")
        ]

    def names(self) -> set[str]:
        """The names directly under the prefix (files, and the first part of deeper ones)."""
        return {relative.split("/", 1)[0] for relative in self.files}


def open_url(url: str) -> RemoteFile | RemotePrefix:
    """What `url` names, asked of storage once: the object, opened and pinned as a
    `RemoteFile`, or the prefix, listed as a `RemotePrefix`."""
    probe = _Probe(url)
    return RemotePrefix(url) if probe.is_prefix else RemoteFile(url, probe)


class RemoteFile:
    """An object in storage, read-only: a `ByteSource` whose reads are ranged requests.

    `path` is the redacted URL (what every message shows); the real URL stays private.
    """

    prefetches = True  # `will_read` ranges are fetched ahead, concurrently
    links = False  # object stores have no symlinks

    def __init__(self, url: str, probe: _Probe | None = None) -> None:
        self._url = url
        self.path = redact(url)
        self.file_key = identity_key(Url(url))
        self.keep_open = True
        self.bytes_fetched = 0
        self.requests = 0
        self._counter_lock = threading.Lock()
        self._pages: OrderedDict[int, bytes] = OrderedDict()
        self._page_lock = threading.Lock()
        self._handle_lock = threading.Lock()
        self._chunks: list[_Chunk] = []
        self._starts: list[int] = []
        self._seq = next(_file_seq)
        probe = probe if probe is not None else _Probe(url)
        if probe.is_prefix:
            raise CheckpointError(self.path, "is a directory (a prefix), not a checkpoint")
        self.fs, self._key, self._handle = probe.fs, probe.key, probe.handle
        self._count(probe.requests)
        info = probe.info
        self.size = int(info.get("size") or 0)
        if self.size == 0:
            raise CheckpointError(self.path, "is empty")
        self.identity = _identity(info)

    def _count(self, requests: int, nbytes: int = 0) -> None:
        with self._counter_lock:
            self.requests += requests
            self.bytes_fetched += nbytes

    # -- reads ---------------------------------------------------------------------------------

    def fetch(self, start: int, end: int) -> bytes:
        """Bytes ``start … end`` in one request (retried); short data is a truncation."""
        from fsspec.spec import AbstractBufferedFile

        def attempt() -> bytes:
            self._count(1)
            if isinstance(self._handle, AbstractBufferedFile):
                data = self._handle._fetch_range(start, end)  # the backend's ranged GET
            else:
                with self._handle_lock:
                    self._handle.seek(start)
                    data = self._handle.read(end - start)
            self._count(0, len(data))
            return data

        data = _retrying(attempt, self.path)
        if len(data) != end - start:
            raise CheckpointError(self.path, "truncated (shorter than when it was opened)")
        return data

    def read_at(self, offset: int, size: int) -> bytes:
        """Exactly `size` bytes at `offset`."""
        buffer = bytearray(size)
        if self.readinto(offset, memoryview(buffer)) != size:
            raise CheckpointError(self.path, "truncated")
        return bytes(buffer)

    def readinto(self, offset: int, buffer: memoryview) -> int:
        """Fill `buffer` from `offset` (less only at the end of the object): from prefetched
        chunks where planned, the page cache for small reads, else one direct request."""
        end = min(offset + len(buffer), self.size)
        if end <= offset:
            return 0
        pos = offset
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        chunks = self._chunks
        while pos < end and i < len(chunks):
            chunk = chunks[i]
            i += 1
            if chunk.end <= pos:
                continue
            if chunk.start >= end:
                break
            if chunk.start > pos:
                self._read_plain(pos, buffer[pos - offset : chunk.start - offset])
                pos = chunk.start
            stop = min(end, chunk.end)
            view = buffer[pos - offset : stop - offset]
            if not _prefetcher.take(self, chunk, pos, view):
                self._read_plain(pos, view)
            pos = stop
        if pos < end:
            self._read_plain(pos, buffer[pos - offset : end - offset])
        return end - offset

    def readv(self, offset: int, buffers: Sequence) -> int:
        """Fill `buffers` in order from `offset` (less only at the end of the object). One
        `readinto` each: ranged requests have no vectored form, and planned chunks already
        span the run."""
        done = 0
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            part = self.readinto(offset + done, view)
            done += part
            if part != len(view):
                break
        return done

    def _read_plain(self, pos: int, view: memoryview) -> None:
        if len(view) > SMALL_READ:
            view[:] = self.fetch(pos, pos + len(view))
            return
        first, last = pos // PAGE, (pos + len(view) - 1) // PAGE
        with self._page_lock:
            missing = [p for p in range(first, last + 1) if p not in self._pages]
            if missing:
                lo, hi = missing[0], missing[-1]
                data = self.fetch(lo * PAGE, min(self.size, (hi + 1) * PAGE))
                for p in range(lo, hi + 1):
                    self._pages[p] = data[(p - lo) * PAGE : (p - lo + 1) * PAGE]
            done = 0
            for p in range(first, last + 1):
                self._pages.move_to_end(p)
                page = self._pages[p]
                at = pos + done - p * PAGE
                piece = page[at : at + len(view) - done]
                view[done : done + len(piece)] = piece
                done += len(piece)
            while len(self._pages) > MAX_PAGES:
                self._pages.popitem(last=False)

    def will_read(self, ranges: Sequence[tuple[int, int]], readers: int = 1) -> None:
        """Plan the ranges the reader will take, in its order, and start fetching them.

        Chunks are sized so that two per reader fit the budget while they are in flight:
        with `readers` inputs read in lockstep, each chunk is at most ``BUDGET / (2 *
        HELD_WHILE_FETCHING * readers)`` bytes (at least `MIN_CHUNK`), so read-ahead memory
        stays bounded whatever the input count, and each input's next chunk is on its way
        while the reader takes the current one (one chunk each would leave the link idle
        for a round trip per chunk).
        """
        _prefetcher.forget(self._chunks)
        share = BUDGET // (2 * HELD_WHILE_FETCHING * max(1, readers))
        size = max(MIN_CHUNK, min(CHUNK, share))
        chunks = plan_chunks(ranges, self._seq, size)
        chunks.sort(key=lambda c: c.start)
        self._chunks, self._starts = chunks, [c.start for c in chunks]
        _prefetcher.submit(self, chunks)

    def cache_small_reads(self, ranges: Sequence[tuple[int, int]]) -> bool:
        """Fetch the pages that cover `ranges` into the page cache, at most
        `requests_in_flight` requests at once, neighbouring pages in one request: a walk of
        the structure then finds a round's pages cached instead of waiting for each in
        turn. Pages already cached are not fetched again. False, fetching nothing, when
        they would not fit beside the cached pages (evicting those would undo an earlier
        round): the walk then reads the rest itself."""
        wanted = sorted(
            {
                page
                for start, length in ranges
                if 0 <= start < self.size and length > 0
                for page in range(start // PAGE, (min(start + length, self.size) - 1) // PAGE + 1)
            }
        )
        with self._page_lock:
            missing = [page for page in wanted if page not in self._pages]
            if len(self._pages) + len(missing) > MAX_PAGES:
                return False
        runs: list[list[int]] = []
        for page in missing:
            if runs and runs[-1][-1] == page - 1:
                runs[-1].append(page)
            else:
                runs.append([page])
        if not runs:
            return True

        def get(run: list[int]) -> tuple[list[int], bytes]:
            return run, self.fetch(run[0] * PAGE, min(self.size, (run[-1] + 1) * PAGE))

        with ThreadPoolExecutor(min(len(runs), requests_in_flight())) as pool:
            fetched = list(pool.map(get, runs))
        with self._page_lock:
            for run, data in fetched:
                for i, page in enumerate(run):
                    self._pages[page] = data[i * PAGE : (i + 1) * PAGE]
            while len(self._pages) > MAX_PAGES:
                self._pages.popitem(last=False)
        return True

    def copy_range_to(self, dst_fd: int, src_at: int, dst_at: int, count: int) -> None:
        """Copy `count` bytes at `src_at` to `dst_fd` at `dst_at`, a chunk at a time."""
        while count > 0:
            step = min(count, CHUNK)
            data = self.read_at(src_at, step)
            view = memoryview(data)
            while view:
                written = os.pwrite(dst_fd, view, dst_at)
                view, dst_at = view[written:], dst_at + written
            src_at, count = src_at + step, count - step

    def h5py_source(self) -> io.BufferedReader:
        # A small buffer: h5py's reads are scattered, and the page cache does the fetching.
        return io.BufferedReader(Window(self, 0, self.size), 8 << 10)

    def sibling(self, name: str) -> RemoteFile:
        """The object called `name` next to this one (a shard beside its index), opened and
        pinned the same way. `name` is one path segment; the caller checks it."""
        base = self._url.split("?", 1)[0].rsplit("/", 1)[0]
        return RemoteFile(f"{base}/{name}")

    # -- identity ------------------------------------------------------------------------------

    def check_unchanged(self) -> None:
        """Raise `InputChanged` if the object's size or ETag/generation is not the pinned one."""

        def attempt() -> dict:
            self.fs.invalidate_cache(self._key)
            self._count(1)
            return self.fs.info(self._key)

        try:
            info = _retrying(attempt, self.path)
        except CheckpointError as exc:
            if exc.problem == "no such object":
                raise InputChanged(self.path, "disappeared while it was being read") from None
            raise
        if _identity(info) != self.identity:
            raise InputChanged(self.path, "changed while it was being read")

    def release(self) -> None:
        """Drop cached pages and planned chunks (the object stays pinned by identity)."""
        _prefetcher.forget(self._chunks)
        self._chunks, self._starts = [], []
        with self._page_lock:
            self._pages.clear()


# ---------------------------------------------------------------------------------------------
# whole-object transfers


def download(url: str, directory: Path) -> Path:
    """Copy the object at `url` into `directory` under its own name (for `wavg evaluate`)."""
    fs, key = filesystem(url)
    display = redact(url)
    local = directory / key.rstrip("/").rsplit("/", 1)[-1]
    _retrying(lambda: fs.get_file(key, os.fspath(local)), display)
    return local


def upload(files: Sequence[tuple[Path, str]]) -> None:
    """Upload local files to URLs one after another, in the order given.

    Each object appears whole or not at all (a single PUT or a completed multipart upload),
    so for a multi-file output pass the shards first and the index last: a reader never
    finds an index whose shards are not there yet.
    """
    for local, url in files:
        fs, key = filesystem(url)
        display = redact(url)
        _retrying(
            lambda fs=fs, key=key, local=local: fs.put_file(os.fspath(local), key),
            display,
            OutputError,
        )


def abort_stale_uploads(url: str, folder: bool = False) -> list[str]:
    """Abort the unfinished multipart uploads of the object at `url` (with `folder`, of every
    object under it as a prefix), returning their keys: what a run cut off by an outage left
    when its own abort failed too. Called before a run uploads its output, so any upload
    found is a dead run's (two runs writing one output at once are a race anyway). Best
    effort: a backend without multipart listing (GCS, a local filesystem) or a missing
    permission (``s3:ListBucketMultipartUploads``) leaves them to the bucket's lifecycle
    rule (docs/bucket-lifecycle.md)."""
    fs, path = filesystem(url)
    if not hasattr(fs, "call_s3"):
        return []
    bucket, _, key = path.strip("/").partition("/")
    prefix = key + "/" if folder else key
    aborted: list[str] = []
    markers: dict[str, str] = {}
    try:
        while True:
            listing = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
            for found in listing.get("Uploads", []):
                if folder or found["Key"] == key:
                    fs.call_s3(
                        "abort_multipart_upload",
                        Bucket=bucket,
                        Key=found["Key"],
                        UploadId=found["UploadId"],
                    )
                    aborted.append(found["Key"])
            if not listing.get("IsTruncated"):
                return aborted
            markers = {
                "KeyMarker": listing["NextKeyMarker"],
                "UploadIdMarker": listing["NextUploadIdMarker"],
            }
    except Exception:
        return aborted


def check_output_bucket(url: str) -> None:
    """Refuse an output URL whose bucket is missing or unreadable before any work is done."""
    fs, key = filesystem(url)
    protocol = url.split("://", 1)[0].lower()
    if protocol not in _BUCKETED:
        return
    bucket = key.strip("/").split("/", 1)[0]
    try:
        _retrying(lambda: fs.info(bucket), redact(url), OutputError)
    except OutputError as exc:
        if exc.problem == "no such object":
            raise OutputError(exc.path, "no such bucket") from None
        raise
