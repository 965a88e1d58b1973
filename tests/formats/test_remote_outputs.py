"""Multi-file outputs in a bucket (sharded weights, model folders) and model folders as URL
inputs, against moto's S3 server: what each run uploads, what it deletes afterwards, and what
a run killed at each step leaves for the next one to clean."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from support import multifile as hm
from support import safety as hs
from support.kerasfiles import assert_one_line_error, run_wavg
from support.remote import BUCKET, keys

from wavg.storage import remote

TOKEN = re.compile(r"\.wavg-([0-9a-f]{8})\.weights\.h5$")


@pytest.fixture(autouse=True)
def fresh(s3, monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)
    recorder = s3[1]
    recorder.log.clear()
    recorder.failures, recorder.hook = 0, None


@pytest.fixture(scope="module")
def outputs(multi, tmp_path_factory):
    """Local averages of the two oldest and of all three sharded checkpoints (references)."""
    directory = tmp_path_factory.mktemp("outputs")
    older, newer = directory / "older.weights.json", directory / "newer.weights.json"
    assert run_wavg("combine", *multi.sharded[:2], "-o", older)[0] == 0
    assert run_wavg("combine", *multi.sharded, "-o", newer)[0] == 0
    return hm.sharded_tensors(older), hm.sharded_tensors(newer)


def index_names(client, key: str) -> set[str]:
    body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    weight_map = json.loads(body)["weight_map"].values()
    return {n for v in weight_map for n in (v if isinstance(v, list) else [v])}


def downloaded(client, prefix: str, directory: Path) -> Path:
    """The objects under `prefix` as files in `directory`."""
    directory.mkdir()
    for key in keys(client, prefix):
        target = directory / key[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(target))
    return directory


def assert_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def assert_clean_output(client, prefix: str) -> set[str]:
    """The prefix holds the index, the placeholder and the shards it names: nothing else."""
    named = index_names(client, f"{prefix}avg.weights.json")
    assert set(keys(client, prefix)) == {
        f"{prefix}{n}" for n in {"avg.weights.json", "avg_00000.weights.h5", *named}
    }
    return named


def test_a_second_sharded_output_deletes_the_shards_only_the_first_needed(
    s3, multi, outputs, tmp_path
):
    client, recorder = s3
    target = f"s3://{BUCKET}/twice/avg.weights.json"
    assert run_wavg("combine", *multi.sharded[:2], "-o", target)[0] == 0
    first = assert_clean_output(client, "twice/")
    # A copy of the first index, kept under another name, still needs the first shards.
    client.copy_object(
        Bucket=BUCKET, Key="twice/kept.weights.json", CopySource=f"{BUCKET}/twice/avg.weights.json"
    )
    code, _, err = run_wavg("combine", *multi.sharded, "-o", target)
    assert code == 0, err
    second = index_names(client, "twice/avg.weights.json")
    assert first.isdisjoint(second)  # new names on every run: never an object overwritten
    recorder.log.clear()
    code, _, err = run_wavg("combine", *multi.sharded, "-o", target)
    assert code == 0, err
    third = index_names(client, "twice/avg.weights.json")
    kept = {"twice/kept.weights.json", *(f"twice/{n}" for n in first)}
    assert set(keys(client, "twice/")) == kept | {
        f"twice/{n}" for n in {"avg.weights.json", "avg_00000.weights.h5", *third}
    }
    # Every delete (the second output's shards, then the marker) comes after the commit.
    writes = [(m, p) for m, p, _ in recorder.log if m in ("PUT", "DELETE") and "/twice/" in p]
    commit = writes.index(("PUT", f"/{BUCKET}/twice/avg.weights.json"))
    assert all(m == "PUT" for m, _ in writes[:commit])
    deleted = {p.rsplit("/", 1)[-1] for m, p in writes[commit + 1 :] if m == "DELETE"}
    assert second <= deleted and not deleted & (first | third)
    back = downloaded(client, "twice/", tmp_path / "back")
    assert_tensors(hm.sharded_tensors(back / "avg.weights.json"), outputs[1])
    hm.assert_weights_equal(hm.load_weights_into_model(back / "avg.weights.json"), multi.reference)


def test_a_keras_written_output_keeps_its_first_shard_until_the_commit(s3, multi, tmp_path):
    client, recorder = s3
    # The previous output was written by Keras: its first shard has the placeholder's name.
    index = multi.sharded[-1]
    renamed = {n: n.replace("ep2", "avg") for n in hm.shard_names(index)}
    text = index.read_text()
    for old, new in renamed.items():
        text = text.replace(old, new)
    client.put_object(Bucket=BUCKET, Key="keras/avg.weights.json", Body=text.encode())
    for old, new in renamed.items():
        client.upload_file(str(index.parent / old), BUCKET, f"keras/{new}")
    first = "keras/avg_00000.weights.h5"
    code, _, err = run_wavg(
        "combine", *multi.sharded, "-o", f"s3://{BUCKET}/keras/avg.weights.json"
    )
    assert code == 0, err
    writes = [(m, p) for m, p, _ in recorder.log if m in ("PUT", "DELETE") and "/keras/" in p]
    commit = writes.index(("PUT", f"/{BUCKET}/keras/avg.weights.json"))
    assert ("PUT", f"/{BUCKET}/{first}") not in writes[:commit]  # still the old index's
    assert_clean_output(client, "keras/")
    assert client.head_object(Bucket=BUCKET, Key=first)["ContentLength"] < 4096  # placeholder


def _start(inputs, target: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*hs.WAVG, "combine", *map(str, inputs), "-o", target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=hs.ROOT,
    )


@pytest.mark.slow
@pytest.mark.parametrize("step", ["first shard", "index", "first delete"])
def test_a_run_killed_while_uploading_leaves_a_whole_output_and_the_next_run_cleans_up(
    s3, multi, outputs, tmp_path, step
):
    """kill -9 at a chosen request: before the commit (a shard, the index: not stored) and
    after it (the first delete of the previous output's shards)."""
    client, recorder = s3
    prefix = f"killed-{step.replace(' ', '-')}/"
    target = f"s3://{BUCKET}/{prefix}avg.weights.json"
    assert run_wavg("combine", *multi.sharded[:2], "-o", target)[0] == 0
    assert run_wavg("combine", *multi.sharded[:2], "-o", target)[0] == 0  # a run to replace
    proc: list[subprocess.Popen] = []  # the run to kill, until it is killed
    killed: list[subprocess.Popen] = []

    def kill(method, path, environ):
        if not path.startswith(f"/{BUCKET}/{prefix}"):
            return None
        if killed:  # a request the killed run sent before it died: it never arrives
            return False
        if not proc:
            return None
        name = path.rsplit("/", 1)[-1]
        hit = {
            "first shard": method == "PUT" and TOKEN.search(name),
            "index": method == "PUT" and name == "avg.weights.json",
            "first delete": method == "DELETE",
        }[step]
        if not hit:
            return None
        victim = proc.pop()
        killed.append(victim)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)  # dead before this request is answered
        return step != "index"  # the killed run's index never arrives

    recorder.hook = kill
    run = _start(multi.sharded, target)
    proc.append(run)
    _, err = run.communicate(timeout=600)
    recorder.wait_idle()  # requests it sent concurrently with the fatal one are answered
    recorder.hook = None
    assert run.returncode == -signal.SIGKILL, f"not killed at the {step}: {err}"
    # Whatever the kill left, the output is whole: the previous one or the new one.
    names = index_names(client, f"{prefix}avg.weights.json")
    assert {f"{prefix}{n}" for n in names} <= set(keys(client, prefix))
    back = downloaded(client, prefix, tmp_path / "after-kill")
    want = outputs[1] if step == "first delete" else outputs[0]
    assert_tensors(hm.sharded_tensors(back / "avg.weights.json"), want)
    leftovers = [k for k in keys(client, prefix) if ".wavg-tmp-" in k]
    assert len(leftovers) == 1  # the killed run's marker
    # The next run for the output removes everything the killed one left.
    code, _, err = run_wavg("combine", *multi.sharded, "-o", target)
    assert code == 0, err
    assert_clean_output(client, prefix)


def test_a_live_runs_shards_are_never_deleted(s3, multi):
    """A marker written on this host by a running process (this one) protects its shards."""
    client, _ = s3
    live = "live/avg_00003.wavg-0badcafe.weights.h5"
    client.put_object(Bucket=BUCKET, Key=live, Body=b"in flight")
    marker = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    client.put_object(
        Bucket=BUCKET, Key="live/.avg.weights.json.wavg-tmp-0badcafe", Body=json.dumps(marker)
    )
    target = f"s3://{BUCKET}/live/avg.weights.json"
    assert run_wavg("combine", *multi.sharded, "-o", target)[0] == 0
    assert run_wavg("combine", *multi.sharded, "-o", target)[0] == 0
    assert live in keys(client, "live/")


def put_folder(client, folder: Path, prefix: str) -> str:
    """Every file of a local model folder as objects under `prefix`; its URL."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder)}")
    return f"s3://{BUCKET}/{prefix}"


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_model_folders_in_a_bucket_are_averaged_by_ranges_like_local_ones(s3, multi, tmp_path):
    client, recorder = s3
    for folder in multi.folders:
        put_folder(client, folder, f"folders/in/{folder.name}")
    local, remote_out = tmp_path / "local_model", tmp_path / "remote_model"
    assert run_wavg("combine", *multi.folders, "-o", local)[0] == 0
    pattern = f"s3://{BUCKET}/folders/in/dir*/"  # quoted: wavg lists the prefixes
    code, out, err = run_wavg("combine", pattern, "-o", remote_out, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["format"] == "keras folder"
    assert [i["path"] for i in summary["inputs"]] == [
        f"s3://{BUCKET}/folders/in/{f.name}" for f in multi.folders
    ]
    assert tree_bytes(remote_out) == tree_bytes(local)
    _, served = recorder.served("folders/in/")
    total = sum(p.stat().st_size for f in multi.folders for p in f.rglob("*") if p.is_file())
    assert summary["bytes_fetched"] == served < 0.7 * total  # the older optimizer state: never
    # Folder URLs name them too, with or without the trailing slash.
    urls = [f"s3://{BUCKET}/folders/in/{f.name}" for f in multi.folders]
    again = tmp_path / "again_model"
    code, _, err = run_wavg("combine", urls[0], urls[1] + "/", urls[2], "-o", again)
    assert code == 0, err
    assert tree_bytes(again) == tree_bytes(local)


def test_a_prefix_that_is_no_model_folder_is_refused_by_name(s3, multi, tmp_path):
    client, _ = s3
    url = put_folder(client, multi.folders[0], "folders/partial/dir0")
    client.delete_object(Bucket=BUCKET, Key="folders/partial/dir0/model.weights.h5")
    code, _, err = run_wavg("combine", url, "-o", tmp_path / "out_model")
    assert_one_line_error(code, err, url, "not a Keras model folder: no model.weights.h5")
    assert not (tmp_path / "out_model").exists()


def test_a_folder_output_in_a_bucket_is_replaced_config_last_and_pruned(s3, multi, tmp_path):
    client, recorder = s3
    target = f"s3://{BUCKET}/folders/out/avg_model"
    assert run_wavg("combine", *multi.folders[:2], "-o", target)[0] == 0
    client.put_object(Bucket=BUCKET, Key="folders/out/avg_model/assets/stale.txt", Body=b"old")
    recorder.log.clear()
    code, out, err = run_wavg("combine", *multi.folders, "-o", target)
    assert code == 0, err
    puts = [p for m, p, _ in recorder.log if m == "PUT" and "/folders/out/" in p]
    deletes = [p for m, p, _ in recorder.log if m == "DELETE" and "/folders/out/" in p]
    assert puts[-1] == f"/{BUCKET}/folders/out/avg_model/config.json"
    assert deletes == [f"/{BUCKET}/folders/out/avg_model/assets/stale.txt"]
    local = tmp_path / "local_model"
    assert run_wavg("combine", *multi.folders, "-o", local)[0] == 0
    back = downloaded(client, "folders/out/avg_model/", tmp_path / "back")
    assert tree_bytes(back) == tree_bytes(local)
    hm.assert_weights_equal(hm.load_weights_into_model(back), multi.reference)


def test_a_folder_output_never_replaces_a_prefix_that_is_no_model(s3, multi):
    client, recorder = s3
    client.put_object(Bucket=BUCKET, Key="folders/other/notes.txt", Body=b"mine")
    target = f"s3://{BUCKET}/folders/other"
    code, _, err = run_wavg("combine", *multi.folders, "-o", target)
    assert_one_line_error(code, err, target, "not a Keras model folder")
    assert keys(client, "folders/other/") == ["folders/other/notes.txt"]


def test_an_object_name_that_would_leave_the_output_folder_is_refused(s3, multi, tmp_path):
    client, _ = s3
    url = put_folder(client, multi.folders[0], "folders/evil/dir0")
    client.put_object(Bucket=BUCKET, Key="folders/evil/dir0/assets/../../escaped", Body=b"x")
    assert "folders/evil/dir0/assets/../../escaped" in keys(client, "folders/evil/")
    code, _, err = run_wavg("combine", url, "-o", tmp_path / "out_model")
    assert_one_line_error(code, err, url, "not a plain path")
    assert not (tmp_path / "out_model").exists() and not (tmp_path / "escaped").exists()
