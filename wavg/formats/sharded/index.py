"""The index of a sharded Keras checkpoint (``.weights.json``): parse it without trusting it.

Keras writes ``{"metadata": {"total_size": ...}, "weight_map": {"/layers/x/vars":
"m_00000.weights.h5" or [names], ...}}``; every name in it is a file wavg would open, so each
must be a plain file name in the index's own folder. This module reads bytes into a checked structure; it never
opens a shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wavg.errors import CheckpointError, UnsafeCheckpoint

# Keras' index for a model of tens of thousands of variables is a few MB.
MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True)
class ShardIndex:
    """A parsed index: the weight map (group -> shard names) and what else the JSON held."""

    document: dict[str, Any]  # the whole JSON object, for writing a like index
    weight_map: dict[str, list[str]]
    listed_as_list: dict[str, bool]  # whether Keras wrote the group's value as a list
    shards: list[str]  # every shard name, in order of first appearance


def looks_like_index(head: bytes) -> bool:
    """True when `head` (the first bytes of a file) starts a JSON object."""
    return head.lstrip(b" \t\r\n\xef\xbb\xbf")[:1] == b"{"


def keras_base(name: str) -> str:
    """The stem Keras gives the shards of index `name` (``m.weights.json`` -> ``m``)."""
    return Path(name).stem.replace(".weights", "")


def parse_index(data: bytes, path: str) -> ShardIndex:
    """Parse and check an index; raises `CheckpointError` or `UnsafeCheckpoint` naming `path`."""
    try:
        document = json.loads(data.decode("utf-8-sig"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(path, f"not a valid sharded weights index ({_short(exc)})") from None
    if not isinstance(document, dict) or not isinstance(document.get("weight_map"), dict):
        raise CheckpointError(path, "not a sharded weights index (no weight_map object)")
    if not isinstance(document.get("metadata", {}), dict):
        raise CheckpointError(path, "the index's metadata is not an object")
    weight_map: dict[str, list[str]] = {}
    as_list: dict[str, bool] = {}
    shards: dict[str, None] = {}
    for group, value in document["weight_map"].items():
        names = value if isinstance(value, list) else [value]
        if not group.startswith("/") or not names or not all(isinstance(n, str) for n in names):
            raise CheckpointError(path, f"the index's entry {group!r} is not a list of shard names")
        if len(set(names)) != len(names):
            raise CheckpointError(path, f"the index lists one shard twice for {group}")
        for name in names:
            check_shard_name(name, path)
            shards.setdefault(name)
        weight_map[group] = names
        as_list[group] = isinstance(value, list)
    if not weight_map:
        raise CheckpointError(path, "the index lists no weights")
    return ShardIndex(document, weight_map, as_list, list(shards))


def check_shard_name(name: str, path: str) -> None:
    """Refuse a shard name that is not a plain file name in the index's own folder."""
    if (
        name in ("", ".", "..")
        or any(c in name for c in "/\\\0:")
        or name != name.strip()
        or len(name) > 255
    ):
        raise UnsafeCheckpoint(
            path, f"the index names shard {name!r}, which is not a plain file name in its folder"
        )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"key {key!r} appears twice")
        found[key] = value
    return found


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
