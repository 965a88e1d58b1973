"""How the tensors of one output are split among N processes that never talk (a pure
function of the ordered tensor sizes and N, so every part computes the same split), and the
public `commit` that joins the parts once all are written.

A tensor is the unit of work (as it is the unit of a Keras shard); parts are contiguous runs
of the output's tensors, balanced by bytes. The split reads nothing; the commit sees the
formats only through `formats.registry`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from wavg.formats.registry import commit_parts
from wavg.storage.locations import Location, as_location


@dataclass
class CommitSummary:
    """What `commit` did: the output, how many parts and shards it joined, its bytes."""

    output: Location
    parts: int
    shards: int
    bytes_written: int
    seconds: float

    def to_json(self) -> dict:
        data = asdict(self)
        data["output"] = str(self.output)
        data["seconds"] = round(self.seconds, 6)
        return data


def commit(out: str | os.PathLike[str]) -> CommitSummary:
    """Commit the sharded output `out` that N ``combine --part I/N`` runs wrote in parts.

    Every part must be present, complete and made from the same plan (inputs at the same
    versions, weights, options, N); otherwise an `OutputError` names the part and nothing
    is written. The index is written as any sharded output's (the previous output stays
    until then, and its shards are retired after), and the part records are removed.
    """
    started = time.perf_counter()
    location = as_location(out)
    done = commit_parts(location)
    return CommitSummary(
        location, done.parts, done.shards, done.bytes, time.perf_counter() - started
    )


def split_by_bytes(sizes: Sequence[int], parts: int) -> list[range]:
    """Cut the tensors of byte sizes `sizes` (in output order) into `parts` contiguous ranges.

    The rule, documented because independent processes must agree on it: tensor ``i`` goes
    to part ``floor(parts * m_i / total)`` (capped at ``parts - 1``), where ``m_i`` is the
    byte offset of its middle in the concatenation of all tensors and ``total`` their sum
    (all sizes 0: by index instead). Parts are contiguous and in order; a part may be empty
    when a tensor is larger than ``total / parts`` or there are fewer tensors than parts.
    Each part's bytes are within one tensor of ``total / parts``.
    """
    if parts < 1:
        raise ValueError("parts must be at least 1")
    total = sum(sizes)
    owners: list[int] = []
    before = 0
    for i, size in enumerate(sizes):
        if total:
            owner = (parts * (2 * before + size)) // (2 * total)
        else:
            owner = (parts * i) // max(1, len(sizes))
        owners.append(min(parts - 1, owner))
        before += size
    ranges: list[range] = []
    start = 0
    for part in range(parts):
        stop = start
        while stop < len(owners) and owners[stop] == part:
            stop += 1
        ranges.append(range(start, stop))
        start = stop
    return ranges


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)`` with 1 <= I <= N; `ValueError` saying why otherwise."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"--part {text!r} is not I/N (e.g. 2/8)") from None
    if not sep or not 1 <= i <= n:
        raise ValueError(f"--part {text!r}: I must be between 1 and N")
    return i, n
