"""``--dask``: the parts as tasks on a real Dask `LocalCluster` of 2 worker processes (one
per module), on local files and on the test S3 server; the output equals a single-process
``combine`` bit for bit, for several formats and numbers of parts."""

from __future__ import annotations

import pytest
from support import keras3_formats as k3
from support import multifile as hm
from support.remote import BUCKET, keys, put

import wavg
from wavg.averaging.distributed import combine_on_dask


@pytest.fixture(scope="module")
def cluster(s3):
    """Started once the S3 server's environment is set, so the workers inherit it."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as running:
        yield running.scheduler_address


@pytest.fixture(scope="module")
def files(tmp_path_factory, keras_module):
    return k3.save_run(tmp_path_factory.mktemp("k3"))


def single(inputs, directory, summaries=None):
    out = directory / "single" / "avg.weights.json"
    out.parent.mkdir()
    summary = wavg.combine(inputs, out, max_shard_gb=2e-6)
    if summaries is not None:
        summaries.append(summary)
    return hm.sharded_tensors(out)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes(), name


@pytest.mark.parametrize(("fmt", "parts"), [("keras", None), ("folder", 3), ("weights.json", 5)])
def test_a_dask_run_equals_the_single_process_output(fmt, parts, files, cluster, tmp_path):
    out = tmp_path / "avg.weights.json"
    done: list[tuple[int, int]] = []
    plan = wavg.plan_combine(files[fmt])
    summary = combine_on_dask(
        plan,
        out,
        cluster,
        max_shard_gb=2e-6,
        parts=parts,
        progress=lambda d, t: done.append((d, t)),
    )
    count = parts or 2  # one part per worker thread by default
    assert done[-1] == (count, count) and len(done) == count
    assert not summary.dry_run and summary.part is None and summary.bytes_read > 0
    local: list = []
    assert_same_tensors(hm.sharded_tensors(out), single(files[fmt], tmp_path, local))
    # The same summary as a local run: the same keys, inputs, weights and counts.
    mine, theirs = summary.to_json(), local[0].to_json()
    assert mine.keys() == theirs.keys()
    for key in ("inputs", "scheme", "format", "tensors", "copied_tensors", "bytes_read"):
        assert mine[key] == theirs[key], key
    assert {p.name for p in tmp_path.iterdir()} == {
        "single",
        out.name,
        "avg_00000.weights.h5",
        *hm.shard_names(out),
    }


def test_a_dask_run_from_and_to_the_bucket_equals_the_local_output(files, s3, cluster, tmp_path):
    client, _ = s3
    urls = put(client, files["weights.h5"], "dask-in")
    out = f"s3://{BUCKET}/dask-out/avg.weights.json"
    summary = combine_on_dask(wavg.plan_combine(urls), out, cluster, max_shard_gb=2e-6, parts=3)
    assert summary.bytes_fetched > 0
    back = tmp_path / "back"
    back.mkdir()
    for key in keys(client, "dask-out/"):
        client.download_file(BUCKET, key, str(back / key.rsplit("/", 1)[1]))
    names = {p.name for p in back.iterdir()}
    index = back / "avg.weights.json"
    assert names == {index.name, "avg_00000.weights.h5", *hm.shard_names(index)}
    assert_same_tensors(hm.sharded_tensors(index), single(files["weights.h5"], tmp_path))
