"""Put checkpoints in epoch order (oldest first, newest last) and select the newest N.

Natural order compares the numbers in file names as numbers, so ``model_8 < model_9 <
model_10`` whatever order a shell glob produced. The epoch shown for a file is the number
that changes from file to file (``model.05-0.43.h5`` is epoch 5, not 43).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from wavg.errors import UsageError
from wavg.storage.locations import Location, Url, as_location

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


def _bare(path: str | os.PathLike[str] | Url) -> str:
    """The path without its checkpoint suffix, so the 5 of ``.h5`` is never an epoch."""
    folder = str(path.parent) if isinstance(path, Url) else os.path.dirname(os.fspath(path))
    return os.path.join(folder, stem(path))


def epoch_numbers(paths: Sequence[str | os.PathLike[str] | Url]) -> list[int | None]:
    """The epoch of each file as read from its name, or None where the name has no number.

    The epoch is the first number whose value differs between the names; for a single file
    (or names that do not share one pattern) it is the last number in the name.
    """
    names = [stem(p) if _NUMBER.search(stem(p)) else _bare(p) for p in paths]
    keys = [natural_key(name) for name in names]
    same_pattern = len({len(k) for k in keys}) == 1 and all(
        k[i] == keys[0][i] for k in keys for i in range(0, len(k), 2)
    )
    if len(keys) > 1 and same_pattern:
        for i in range(1, len(keys[0]), 2):
            if len({k[i] for k in keys}) > 1:
                return [k[i] for k in keys]  # type: ignore[misc]
    return [k[-2] if len(k) > 1 else None for k in keys]  # type: ignore[misc]


def order_checkpoints(
    paths: Sequence[str | os.PathLike[str] | Url],
    order: str = "natural",
    last: int | None = None,
) -> list[Location]:
    """Return `paths` oldest first, newest last, keeping only the `last` newest if given.

    ``order="given"`` keeps the caller's order. ``"natural"`` sorts by the numbers in the
    names and refuses names it cannot order (no number, or two files with one epoch), since a
    guessed order would silently weight the wrong checkpoint most.
    """
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
            raise UsageError(
                f"--last {last} asks for more checkpoints than the {len(ordered)} given"
            )
        ordered = ordered[-last:]
    return ordered


def _natural_order(paths: list[Location]) -> list[Location]:
    for path in paths:
        if not _NUMBER.search(_bare(path)):
            raise UsageError(
                f"{path}: no epoch number in the name; name files by epoch or pass --order given"
            )
    ordered = sorted(paths, key=lambda p: (natural_key(stem(p)), natural_key(_bare(p))))
    epochs = epoch_numbers(ordered)
    for older, newer, e_old, e_new in zip(ordered, ordered[1:], epochs, epochs[1:], strict=False):
        if e_old == e_new:
            raise UsageError(
                f"{older} and {newer} both look like epoch {e_old}; "
                "pass --order given to set the order yourself"
            )
    return ordered
