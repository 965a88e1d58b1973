"""Put checkpoints in epoch order (oldest first, newest last) and select the newest N.

Natural order compares the numbers in file names as numbers, so ``model_8 < model_9 <
model_10`` whatever order a shell glob produced. The epoch shown for a file is the number
that changes from file to file (``model.05-0.43.h5`` is epoch 5, not 43), read from the part
of the path that tells the inputs apart: never from a folder they all share (``run1/best.h5``
and ``run1/last.h5`` hold no epoch number).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import PurePath
from urllib.parse import urlsplit

from wavg.errors import UsageError
from wavg.storage.locations import Location, Url, as_location, input_names

ORDERS = ("natural", "given")
_NUMBER = re.compile(r"(\d+)")
_SUFFIXES = (".weights.h5", ".keras", ".h5", ".hdf5")


def natural_key(text: str) -> tuple[str | int, ...]:
    """Sort key that orders digit runs by value: ``natural_key('a10') > natural_key('a9')``."""
    parts = _NUMBER.split(text)
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts))


def stem(path: str | os.PathLike[str] | Url) -> str:
    """The file name without a checkpoint suffix (``model_7.weights.h5`` -> ``model_7``)."""
    name = path.name if isinstance(path, Url) else os.path.basename(os.fspath(path))
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _parts(path: str | os.PathLike[str] | Url) -> tuple[str, ...]:
    """The folders and name of `path` (for a URL, its scheme and bucket first)."""
    location = as_location(path)
    if isinstance(location, Url):
        split = urlsplit(location.url)
        return (f"{split.scheme}://{split.netloc}", *filter(None, split.path.split("/")))
    return PurePath(location).parts


def distinct_names(paths: Sequence[str | os.PathLike[str] | Url]) -> list[str]:
    """What tells each input apart, without the checkpoint suffix: its own name when the
    names alone do and each holds a number (a single input: its name), else its path below
    the deepest folder all the inputs share (``run/9/model.keras`` -> ``9/model``).

    A folder every input shares never contributes, so ``run1/best.h5 run1/last.h5`` has no
    epoch number and ``mc3/weights.h5`` is not epoch 3.
    """
    stems = [stem(p) for p in paths]
    if len(stems) < 2 or (len(set(stems)) == len(stems) and all(_NUMBER.search(s) for s in stems)):
        return stems
    parts = [_parts(p) for p in paths]
    shared = 0
    while all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    return ["/".join((*p[shared:-1], name)) for p, name in zip(parts, stems, strict=True)]


def epoch_numbers(paths: Sequence[str | os.PathLike[str] | Url]) -> list[int | None]:
    """The epoch of each input as read from its path (see `distinct_names`), or None where
    that part of the path has no number.

    The epoch is the first number whose value differs between the names; for a single file
    (or names that do not share one pattern) it is the last number in the name.
    """
    keys = [natural_key(name) for name in distinct_names(paths)]
    same_pattern = len({len(k) for k in keys}) == 1 and all(
        k[i] == keys[0][i] for k in keys for i in range(0, len(k), 2)
    )
    if len(keys) > 1 and same_pattern:
        for i in range(1, len(keys[0]), 2):
            if len({k[i] for k in keys}) > 1:
                return [k[i] for k in keys]  # type: ignore[misc]
    return [k[-2] if len(k) > 1 else None for k in keys]  # type: ignore[misc]


def order_checkpoints(
    paths: str | os.PathLike[str] | Url | Sequence[str | os.PathLike[str] | Url],
    order: str = "natural",
    last: int | None = None,
) -> list[Location]:
    """Return `paths` oldest first, newest last, keeping only the `last` newest if given.

    ``order="given"`` keeps the caller's order. ``"natural"`` sorts by the numbers in the
    names and refuses names it cannot order (no number, or two files with one epoch), since a
    guessed order would silently weight the wrong checkpoint most. One str or os.PathLike
    is one name; anything but names is a TypeError (see `storage.locations.input_names`).
    """
    paths = input_names(paths)
    if not paths:
        raise UsageError("no checkpoints given")
    if order not in ORDERS:
        raise UsageError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    ordered = [as_location(p) for p in paths]
    if order == "natural":
        ordered = _natural_order(ordered)
    if last is not None:
        if isinstance(last, bool) or not isinstance(last, int) or last < 1:
            raise UsageError(f"--last must be a positive whole number, got {last!r}")
        if last > len(ordered):
            raise UsageError(  # refused, not clamped: fewer inputs would be a different average
                f"--last {last} asks for more checkpoints than the {len(ordered)} given; pass "
                f"--last {len(ordered)} or fewer, or leave --last out to average all of them"
            )
        ordered = ordered[-last:]
    return ordered


def _natural_order(paths: list[Location]) -> list[Location]:
    """`paths` sorted by the numbers in what tells them apart; a single input needs none."""
    if len(paths) < 2:
        return paths
    names = distinct_names(paths)
    for path, name in zip(paths, names, strict=True):
        if not _NUMBER.search(name):
            raise UsageError(
                f"{path}: no epoch number in the name; name files by epoch or pass --order given"
            )
    ranks = sorted(range(len(paths)), key=lambda i: natural_key(names[i]))
    ordered = [paths[i] for i in ranks]
    epochs = epoch_numbers(ordered)
    for older, newer, e_old, e_new in zip(ordered, ordered[1:], epochs, epochs[1:], strict=False):
        if e_old == e_new:
            raise UsageError(
                f"{older} and {newer} both look like epoch {e_old}; "
                "pass --order given to set the order yourself"
            )
    return ordered
