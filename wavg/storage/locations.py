"""Where a checkpoint lives: a local path or a URL (s3://, gs://, any fsspec protocol).

This module tells the two apart and shows URLs without their secrets (quoted globs are
expanded by `globs`). It never opens a checkpoint and never imports a storage backend.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Hashable, Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

# Two characters at least, so a Windows drive ("C:/x") is never taken for a scheme.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
GLOB_CHARS = re.compile(r"[*?[]")


def is_url(name: object) -> bool:
    """True for ``scheme://...`` strings and `Url` objects (``file://`` included)."""
    return isinstance(name, Url) or (isinstance(name, str) and bool(_URL.match(name)))


def redact(url: str) -> str:
    """`url` safe to print: user info and query string (signatures, tokens) replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class Url:
    """A checkpoint's URL; `str()` is the redacted form, `.url` the one to open.

    It answers `name` and `parent` like a `Path`, so ordering and the plan table need no
    special case, but it is deliberately not path-like: nothing can open it as a local file.
    """

    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url

    def __str__(self) -> str:
        return redact(self.url)

    def __repr__(self) -> str:
        return f"Url({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Url) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return posixpath.basename(urlsplit(self.url).path.rstrip("/"))

    @property
    def parent(self) -> Url:
        p = urlsplit(self.url)
        path = posixpath.dirname(p.path.rstrip("/"))
        return Url(urlunsplit((p.scheme, p.netloc, path, "", "")))


Location = Path | Url


def is_plain_relative_path(name: str) -> bool:
    """Whether `name` is a relative path of plain segments joined by ``/``: no empty, ``.``
    or ``..`` segment (so no leading ``/``), no backslash and no NUL. Names a checkpoint
    gives for its own files must be such paths, or a copy of them could land outside."""
    return not (
        any(s in ("", ".", "..") for s in name.split("/")) or any(c in name for c in "\\\0")
    )


def as_location(name: str | os.PathLike[str] | Url) -> Location:
    """A `Url` for a URL (``file://`` becomes the local `Path` it names), else a `Path`."""
    if isinstance(name, Url | Path):
        return name
    if is_url(name):
        text = str(name)
        if text.lower().startswith("file://"):
            return Path(unquote(urlsplit(text).path))
        return Url(text)
    return Path(name)


def input_names(paths: object, parameter: str = "paths") -> list[str | os.PathLike[str] | Url]:
    """`paths` as a list of input names: one str, os.PathLike or `Url` is one name (a path,
    a URL or a quoted glob), any other iterable gives its items.

    Anything else is a TypeError naming `parameter`, bytes included: iterated, a string would
    be read as one name per character and bytes as numbers, and both fail far from the call.
    """
    if isinstance(paths, str | os.PathLike | Url):
        return [paths]
    if isinstance(paths, bytes | bytearray | memoryview) or not isinstance(paths, Iterable):
        raise TypeError(
            f"{parameter} must be a path, URL or glob (str or os.PathLike) or a list of them, "
            f"not {type(paths).__name__}"
        )
    names = list(paths)
    for i, name in enumerate(names):
        if not isinstance(name, str | os.PathLike | Url):
            raise TypeError(
                f"{parameter}[{i}] must be a str or os.PathLike, not {type(name).__name__}"
            )
    return names


def identity_key(location: Location) -> Hashable | None:
    """What makes two locations the same object: (device, inode) for an existing local file,
    the URL without query for a URL, None for a local path that does not exist (yet)."""
    if isinstance(location, Url):
        p = urlsplit(location.url)
        return ("url", p.scheme.lower(), p.netloc, p.path)
    try:
        st = location.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
