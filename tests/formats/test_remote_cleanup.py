"""Cleanup after a committed bucket output is best effort: an outage right after the commit
(met through a proxy that cuts the link) warns and exits 0, and the next run finishes it;
a multipart upload an outage left unfinished is aborted by the next run for that output."""

from __future__ import annotations

import os

import pytest
from support import multifile as hm
from support import safety as hs
from support.kerasfiles import run_wavg
from support.latency_proxy import LatencyProxy
from support.remote import BUCKET, keys

from wavg.storage import remote


@pytest.fixture
def proxy(s3, monkeypatch):
    """The moto server behind a proxy that can cut the link; boto pointed at the proxy."""
    import s3fs

    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)
    with LatencyProxy(os.environ["AWS_ENDPOINT_URL"]) as link:
        monkeypatch.setenv("AWS_ENDPOINT_URL", link.url)
        s3fs.S3FileSystem.clear_instance_cache()
        yield link
    s3fs.S3FileSystem.clear_instance_cache()


def index_names(client, key: str) -> set[str]:
    import json

    body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    weight_map = json.loads(body)["weight_map"].values()
    return {n for v in weight_map for n in (v if isinstance(v, list) else [v])}


def test_an_outage_right_after_a_sharded_commit_warns_exits_0_and_the_next_run_retires(
    s3, proxy, multi, tmp_path
):
    client, _ = s3
    target = f"s3://{BUCKET}/outage/avg.weights.json"
    assert run_wavg("combine", *multi.sharded[:2], "-o", target)[0] == 0
    first = index_names(client, "outage/avg.weights.json")
    proxy.cut_after(lambda method, path: method == "PUT" and path.endswith("/avg.weights.json"))
    # Another process: its marker is then a dead run's for the next run (this one lives on).
    run = hm.start_combine(multi.sharded, target)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert "warning" in err and "avg.weights.json" in err and "Traceback" not in err
    second = index_names(client, "outage/avg.weights.json")
    assert first.isdisjoint(second)
    left = {k.rsplit("/", 1)[-1] for k in keys(client, "outage/")}
    assert first <= left  # the old shards wait for the next run
    back = tmp_path / "back"
    back.mkdir()
    for key in keys(client, "outage/"):
        client.download_file(BUCKET, key, str(back / key.rsplit("/", 1)[-1]))
    reference = tmp_path / "ref.weights.json"
    assert run_wavg("combine", *multi.sharded, "-o", reference)[0] == 0
    got, want = hm.sharded_tensors(back / "avg.weights.json"), hm.sharded_tensors(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] == want[name]).all(), name
    proxy.reset()
    assert run_wavg("combine", *multi.sharded, "-o", target)[0] == 0
    left = {k.rsplit("/", 1)[-1] for k in keys(client, "outage/")}
    assert not first & left and not any(".wavg-tmp-" in n for n in left)


def test_an_outage_right_after_a_folder_commit_warns_and_exits_0(s3, proxy, multi):
    client, _ = s3
    target = f"s3://{BUCKET}/outage-folder/avg"
    client.put_object(Bucket=BUCKET, Key="outage-folder/avg/config.json", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key="outage-folder/avg/stale.bin", Body=b"old")
    proxy.cut_after(lambda method, path: method == "PUT" and path.endswith("/avg/config.json"))
    code, _, err = run_wavg("combine", *multi.folders, "-o", target)
    assert code == 0, err
    assert "warning" in err and "Traceback" not in err
    assert "outage-folder/avg/stale.bin" in keys(client, "outage-folder/avg/")
    proxy.reset()
    assert run_wavg("combine", *multi.folders, "-o", target)[0] == 0
    assert "outage-folder/avg/stale.bin" not in keys(client, "outage-folder/avg/")


def uploads(client, prefix: str) -> set[str]:
    listing = client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
    return {u["Key"] for u in listing.get("Uploads", [])}


def left_unfinished(client, key: str) -> None:
    """What a run cut off mid-upload leaves when its abort fails too: an upload begun, with a
    part, never completed nor aborted."""
    started = client.create_multipart_upload(Bucket=BUCKET, Key=key)
    client.upload_part(
        Bucket=BUCKET, Key=key, UploadId=started["UploadId"], PartNumber=1, Body=b"x" * 1024
    )


def test_the_next_run_for_an_output_aborts_the_upload_an_outage_left_unfinished(s3, samples, multi):
    client, _ = s3
    for key in ("stale/avg.h5", "stale/avg.h5.bak", "stale/dir/model.weights.h5"):
        left_unfinished(client, key)
    assert run_wavg("combine", *samples[:2], "-o", f"s3://{BUCKET}/stale/avg.h5")[0] == 0
    assert uploads(client, "stale/") == {"stale/avg.h5.bak", "stale/dir/model.weights.h5"}
    code, _, err = run_wavg("combine", *multi.folders, "-o", f"s3://{BUCKET}/stale/dir")
    assert code == 0, err
    assert uploads(client, "stale/") == {"stale/avg.h5.bak"}  # another output's: kept


def test_wavg_commit_reports_a_failed_cleanup_as_one_warning_line_and_exits_0(s3, proxy, multi):
    """`wavg commit` retires the previous output after the index, as combine does; an outage
    then is a `wavg: warning:` line (not Python's warning format with a file and line)."""
    import subprocess

    client, _ = s3
    target = f"s3://{BUCKET}/outage-parts/avg.weights.json"
    assert run_wavg("combine", *multi.sharded[:2], "-o", target)[0] == 0
    first = index_names(client, "outage-parts/avg.weights.json")
    for part in ("1/2", "2/2"):
        code, _, err = run_wavg("combine", *multi.sharded, "-o", target, "--part", part)
        assert code == 0, err
    proxy.cut_after(lambda method, path: method == "PUT" and path.endswith("/avg.weights.json"))
    done = subprocess.run([*hs.WAVG, "commit", target], capture_output=True, text=True, cwd=hs.ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wavg: warning: "), done.stderr
    assert "avg.weights.json" in lines[0]
    assert first.isdisjoint(index_names(client, "outage-parts/avg.weights.json"))
