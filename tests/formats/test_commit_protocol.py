"""The sharded commit protocol's one stale rule, on both targets (a local directory and a
bucket prefix): what a run removes of other runs' leftovers, and that markers the previous
release left (local ``-<pid>-<token>`` lists, bucket ``-<token>`` stamps) are still cleaned."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from support import multifile as hm
from support.kerasfiles import run_wavg
from support.remote import BUCKET, keys

import wavg
from wavg.formats.sharded.commit import MARKER_TTL, clean_leftovers
from wavg.storage import remote
from wavg.storage.bucket_target import BucketTarget
from wavg.storage.local_target import LocalTarget

INDEX = "avg.weights.json"
NAMED = "avg_00000.wavg-aaaaaaaa.weights.h5"  # the current index's shard
UNFINISHED = "avg_00003.wavg-bbbbbbbb.weights.h5"  # the other run's own shard
REPLACED = "avg_00001.weights.h5"  # a shard the other run's commit made stale


class Place:
    """The folder of an output `avg.weights.json`: a local directory or a bucket prefix."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        if kind == "local":
            self.folder = tmp_path / "out"
            self.folder.mkdir()
            self.target = LocalTarget(self.folder / INDEX)
        else:
            import s3fs

            self.client = request.getfixturevalue("s3")[0]
            s3fs.S3FileSystem.clear_instance_cache()
            self.prefix = f"stale-{request.node.name}/".replace("[", "-").replace("]", "")
            staging = tmp_path / "staging"
            staging.mkdir()
            self.target = BucketTarget(f"s3://{BUCKET}/{self.prefix}{INDEX}", staging)

    def put(self, name: str, body: bytes) -> None:
        if self.kind == "local":
            (self.folder / name).write_bytes(body)
        else:
            self.client.put_object(Bucket=BUCKET, Key=f"{self.prefix}{name}", Body=body)

    def names(self) -> set[str]:
        if self.kind == "local":
            return {p.name for p in self.folder.iterdir()}
        return {k[len(self.prefix) :] for k in keys(self.client, self.prefix)}


def stamp(host: str, pid: int, age: float = 0.0) -> bytes:
    started = time.time() - age
    return json.dumps(
        {"host": host, "pid": pid, "started": started, "replaces": [REPLACED]}
    ).encode()


HERE = socket.gethostname()
DEAD = hm.dead_pid()
# (marker name after ".avg.weights.json.wavg-tmp-", its body, what the next run removes)
MARKERS = {
    "this host, process gone": (f"{DEAD}-bbbbbbbb", stamp(HERE, DEAD), {UNFINISHED, REPLACED}),
    "this host, process running": (f"{os.getpid()}-bbbbbbbb", stamp(HERE, os.getpid()), set()),
    "another host, recent": ("1-bbbbbbbb", stamp("elsewhere", 1), set()),
    "another host, over a day old": (
        "1-bbbbbbbb",
        stamp("elsewhere", 1, MARKER_TTL + 60),
        {UNFINISHED, REPLACED},
    ),
    "previous release, bucket, gone": ("bbbbbbbb", stamp(HERE, DEAD), {UNFINISHED, REPLACED}),
    "previous release, local, gone": (
        f"{DEAD}-bbbbbbbb",
        json.dumps([REPLACED]).encode(),
        {UNFINISHED, REPLACED},
    ),
    "previous release, local, before its commit": (f"{DEAD}-bbbbbbbb", b"", {UNFINISHED}),
    "previous release, local, running": (
        f"{os.getpid()}-bbbbbbbb",
        json.dumps([REPLACED]).encode(),
        set(),
    ),
}


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)


@pytest.mark.parametrize("kind", ["local", "bucket"])
@pytest.mark.parametrize("case", list(MARKERS))
def test_both_targets_share_one_stale_rule(kind, case, tmp_path, request):
    """A dead run's marker has its shards and the shards it replaced removed, then itself;
    a marker whose run may live protects them. The same on a disk and in a bucket."""
    place = Place(kind, tmp_path, request)
    suffix, body, removed = MARKERS[case]
    marker = f".{INDEX}.wavg-tmp-{suffix}"
    place.put(INDEX, json.dumps({"weight_map": {"/layers/d/vars": NAMED}}).encode())
    for name in (NAMED, UNFINISHED, REPLACED):
        place.put(name, b"shard")
    place.put(marker, body)
    before = place.names()
    clean_leftovers(place.target)
    after = before - removed - ({marker} if removed else set())
    assert place.names() == after


def test_a_previous_release_local_marker_is_cleaned_by_the_next_run(multi, tmp_path):
    """kill -9 of the previous release left its marker (``-<pid>-<token>``, listing the
    shards its commit made stale), a shard of its own, and a stale shard: all removed."""
    out = tmp_path / INDEX
    wavg.combine(multi.sharded, out)
    (tmp_path / f".{INDEX}.wavg-tmp-{DEAD}-cccccccc").write_text(json.dumps([REPLACED]))
    (tmp_path / "avg_00004.wavg-cccccccc.weights.h5").write_bytes(b"unfinished")
    (tmp_path / REPLACED).write_bytes(b"stale")
    (tmp_path / f".{INDEX}.wavg-tmp-{DEAD}-dddddddd").write_bytes(b"")  # killed at once
    wavg.combine(multi.sharded, out)
    assert {p.name for p in tmp_path.iterdir()} == {
        INDEX,
        "avg_00000.weights.h5",
        *hm.shard_names(out),
    }


def test_a_previous_release_bucket_marker_is_cleaned_by_the_next_run(s3, multi):
    """kill -9 of the previous release left its marker (``-<token>``, a stamp) and a shard."""
    client, _ = s3
    prefix = "previous-release/"
    target = f"s3://{BUCKET}/{prefix}{INDEX}"
    assert run_wavg("combine", *multi.sharded, "-o", target)[0] == 0
    leftovers = {
        f".{INDEX}.wavg-tmp-eeeeeeee": stamp(HERE, DEAD),
        "avg_00004.wavg-eeeeeeee.weights.h5": b"unfinished",
        REPLACED: b"stale",
    }
    for name, body in leftovers.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}{name}", Body=body)
    code, _, err = run_wavg("combine", *multi.sharded, "-o", target)
    assert code == 0, err
    index = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}{INDEX}")["Body"].read())
    named = {n for v in index["weight_map"].values() for n in (v if isinstance(v, list) else [v])}
    assert set(keys(client, prefix)) == {
        f"{prefix}{n}" for n in {INDEX, "avg_00000.weights.h5", *named}
    }


def test_a_bucket_output_counts_the_placeholder_only_when_it_writes_it(s3, multi, tmp_path):
    """Written bytes are the same as a local output's: the placeholder counts on the first
    run, which puts it, not on the next, which finds it there."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    url = f"s3://{BUCKET}/counted/{INDEX}"
    local = [wavg.combine(multi.sharded, tmp_path / INDEX).bytes_written for _ in range(2)]
    bucket = [wavg.combine(multi.sharded, url).bytes_written for _ in range(2)]
    assert bucket == local and local[0] > local[1]
