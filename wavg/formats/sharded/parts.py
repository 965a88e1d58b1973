"""A sharded output written by N processes that never talk: each part writes its own shards
and a record of them (`part_output`), and `commit_parts` joins the N records into the index.

A part's shards have names fixed by the plan (``<base>_NNNNN.wavg-<plan token>.weights.h5``)
and each lands whole (a temporary file, then one rename or upload), so a retried or duplicate
part rewrites the same names harmlessly; its record ``.<name>.wavg-part-<I>-of-<N>`` lands
last. The commit checks every record against the others, then writes the index with the
sharded output's own protocol (`sharded.commit`) and removes the records. Which tensors a
part holds is the caller's split; nothing here averages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wavg.errors import OutputError, UsageError
from wavg.formats.base import Checkpoint, Writer
from wavg.formats.composite import PartFiles, PartsWriter
from wavg.formats.sharded.commit import ShardedCommit, own_pattern
from wavg.formats.sharded.index import MAX_INDEX_BYTES, keras_base
from wavg.formats.sharded.reshard import (
    DEFAULT_MAX_SHARD_GB,
    GB,
    KERAS_TREES,
    ShardFiles,
    index_bytes,
    keras_shards,
    output_tensors,
    weight_map,
)
from wavg.storage.atomic import process_alive
from wavg.storage.target import Target, target_for

RECORD_VERSION = 1


@dataclass(frozen=True)
class PartRun:
    """Part `index` of `count` (1-based): `plan` is what every part must have been made from
    (JSON-ready: inputs and their versions, weights, options), `split` the caller's pure
    split of the output's tensor sizes into `count` contiguous ranges."""

    index: int
    count: int
    plan: dict[str, Any]
    split: Callable[[Sequence[int], int], list[range]]


def record_name(out_name: str, index: int, count: int) -> str:
    return f".{out_name}.wavg-part-{index}-of-{count}"


def _record_pattern(out_name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out_name)}\.wavg-part-(\d+)-of-(\d+)")


def _temp_pattern(out_name: str, index: int) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out_name)}\.wavg-part-{index}-tmp-(\d+)-\d+")


def input_versions(ckpt: Checkpoint) -> list[list[Any]]:
    """``[name, size, version]`` of every file `ckpt` was read from: what must not differ
    between the parts (an object's ETag or generation, a local file's size and mtime)."""
    files = ckpt.file.files if isinstance(ckpt.file, PartFiles) else [ckpt.file]
    return [
        [
            f.path,
            getattr(f, "size", None),
            repr(getattr(f, "version", getattr(f, "identity", None))),
        ]
        for f in files
    ]


def check_parts_possible(newest: Checkpoint, out: Path) -> None:
    """Refuse, before anything is read, an output or inputs parts cannot make."""
    if not out.name.lower().endswith(".weights.json"):
        raise UsageError(f"--part and --dask write a sharded .weights.json output, not {out}")
    if newest.layout not in KERAS_TREES:
        raise UsageError(
            f"{newest.path}: {newest.layout.name} inputs cannot be averaged in parts; "
            "run without --part/--dask"
        )


def plan_id(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def part_output(
    newest: Checkpoint,
    out: Path,
    keep: Callable[[str], bool] | None,
    max_shard_gb: float | None,
    run: PartRun,
) -> Iterator[Writer]:
    """A writer for part `run.index`'s shards of the output `out`; on normal exit they are
    in place, then the part's record."""
    gb = DEFAULT_MAX_SHARD_GB if max_shard_gb is None else max_shard_gb
    tensors = output_tensors(newest, keep)
    plan = {**run.plan, "parts": run.count, "max_shard_gb": gb, "output": out.name}
    token = plan_id(plan)[:8]
    base = keras_base(out.name)
    mine: list[tuple[str, list]] = []
    number = 0
    for part, span in enumerate(run.split([t.nbytes for t in tensors], run.count), start=1):
        for shard in keras_shards([tensors[i] for i in span], gb * GB):
            if part == run.index:
                mine.append((f"{base}_{number:05}.wavg-{token}.weights.h5", shard))
            number += 1
    target = target_for(out)
    target.check_file()
    _remove_dead_temps(target, run.index)
    _remove_other_runs(target, run.count)
    temps: list[str] = []
    try:
        paths = []
        for k in range(len(mine)):
            temps.append(f".{out.name}.wavg-part-{run.index}-tmp-{os.getpid()}-{k}")
            paths.append(target.create(temps[-1]))
        writer = ShardFiles(newest, list(zip(paths, [s for _, s in mine], strict=True)))

        def publish() -> int:
            sizes = {}
            for temp, path, (name, _) in zip(temps, paths, mine, strict=True):
                sizes[name] = os.path.getsize(path)
                target.put_file(name, temp)
            temps.clear()
            target.sync()
            record = {
                "wavg_part": RECORD_VERSION,
                "plan": plan_id(plan),
                "part": run.index,
                "parts": run.count,
                "fingerprint": plan,
                "shards": [{"name": name, "size": sizes[name]} for name, _ in mine],
                "weight_map": weight_map([(n, [t.name for t in s]) for n, s in mine]),
                "total_size": sum(t.nbytes for _, s in mine for t in s),
            }
            data = json.dumps(record).encode()
            target.put(record_name(out.name, run.index, run.count), data)
            target.sync()
            return len(data)

        try:
            yield PartsWriter([writer], publish)
        finally:
            writer.close()
    finally:
        for temp in temps:
            target.delete(temp)


def _remove_other_runs(target: Target, count: int) -> None:
    """The records of a run of another number of parts for this output: one distributed
    run per output at a time, and an abandoned one must not block the commit of this one."""
    pattern = _record_pattern(target.name)
    for entry in target.entries():
        found = pattern.fullmatch(entry)
        if found and int(found[2]) != count:
            target.delete(entry)


def _remove_dead_temps(target: Target, index: int) -> None:
    """The temporary shards of this part that a killed process of this host left."""
    pattern = _temp_pattern(target.name, index)
    for entry in target.entries():
        found = pattern.fullmatch(entry)
        if found and not process_alive(int(found[1])):
            target.delete(entry)


@dataclass(frozen=True)
class CommittedParts:
    """What a commit joined: how many parts and shards, and the output's bytes."""

    parts: int
    shards: int
    bytes: int


def commit_parts(out: Path) -> CommittedParts:
    """Check the N part records beside `out` and commit their shards as one index.

    Every part 1..N must be there, made from one plan (the same inputs at the same versions,
    weights, options and N), with every shard it lists present at its size; else an
    `OutputError` naming the part, and nothing is written. The index is committed as any
    sharded output is (the previous output's shards retired after it); then the records go.
    """
    target = target_for(out)
    target.check_file()
    entries = target.entries()
    pattern = _record_pattern(out.name)
    found = [(int(m[1]), int(m[2])) for e in entries if (m := pattern.fullmatch(e))]
    if not found:
        raise OutputError(out, "no parts to commit (run wavg combine --part I/N first)")
    count = Counter(n for _, n in found).most_common(1)[0][0]
    stray = next(((i, n) for i, n in sorted(found) if n != count), None)
    if stray is not None:
        raise OutputError(
            out, f"part {stray[0]}/{stray[1]} belongs to a run of {stray[1]} parts, not {count}"
        )
    records = []
    for index in range(1, count + 1):
        records.append(_read_record(target, out, index, count))
    plans = Counter(r["plan"] for r in records)
    majority = max(plans, key=lambda p: (plans[p], p == records[0]["plan"]))
    for index, record in enumerate(records, start=1):
        if record["plan"] != majority:
            other = next(i for i, r in enumerate(records, start=1) if r["plan"] == majority)
            raise OutputError(
                out,
                f"part {index}/{count} was made from another plan than part {other}/{count} "
                "(inputs changed, or other inputs, weights or options); run it again",
            )
    groups: dict[str, list[str]] = {}
    shards = 0
    for index, record in enumerate(records, start=1):
        for shard in record["shards"]:
            if entries.get(shard["name"]) != shard["size"]:
                raise OutputError(
                    out, f"part {index}/{count}: shard {shard['name']} is missing or incomplete"
                )
            shards += 1
        for group, names in record["weight_map"].items():
            listed = groups.setdefault(group, [])
            listed.extend(n for n in names if n not in listed)
    total = sum(int(r["total_size"]) for r in records)
    index_data = index_bytes(groups, total)
    with ShardedCommit(out) as commit:
        written = commit.prepare(index_data)
        commit.commit()
    for index in range(1, count + 1):
        target.delete(record_name(out.name, index, count))
    size = sum(s["size"] for r in records for s in r["shards"])
    return CommittedParts(parts=count, shards=shards, bytes=size + written)


def _read_record(target: Target, out: Path, index: int, count: int) -> dict[str, Any]:
    name = record_name(out.name, index, count)
    data = target.read(name, MAX_INDEX_BYTES)
    if not data:
        raise OutputError(
            out, f"part {index}/{count} is missing (run wavg combine --part {index}/{count})"
        )
    try:
        record = json.loads(data)
        ok = (
            record["wavg_part"] == RECORD_VERSION
            and record["part"] == index
            and record["parts"] == count
            and isinstance(record["plan"], str)
            and all(
                isinstance(s["name"], str) and isinstance(s["size"], int) for s in record["shards"]
            )
            and isinstance(record["weight_map"], dict)
        )
    except (ValueError, KeyError, TypeError):
        ok = False
    if ok:  # every name one of this output's own shard names, listed by the part
        own = own_pattern(keras_base(out.name))
        listed = {s["name"] for s in record["shards"]}
        ok = all(own.fullmatch(n) for n in listed) and all(
            isinstance(names, list) and set(names) <= listed
            for names in record["weight_map"].values()
        )
    if not ok:
        raise OutputError(out, f"part {index}/{count}: its record {name} is damaged")
    return record
