"""Checkpoints in object storage, against a real HTTP S3 endpoint: moto's standalone server
(the `s3` fixture, recorded by `support.remote.Recorder`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.kerasfiles import assert_one_line_error, run_wavg
from support.reference import SAMPLES, h5_tensors
from support.remote import BUCKET, SECRET, get, keys, put, unused_endpoint

from wavg.formats.registry import open_source
from wavg.storage import remote
from wavg.storage.locations import Url, redact
from wavg.workflows.evaluate import evaluate


@pytest.fixture(autouse=True)
def fresh(request, monkeypatch):
    """A new S3 client per test (it reads the environment) and quick retries."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)
    if "s3" in request.fixturenames:
        _, recorder = request.getfixturevalue("s3")
        recorder.log.clear()
        recorder.failures, recorder.hook = 0, None


@pytest.mark.parametrize("fmt", ["h5", "keras", "weights.h5"])
def test_remote_inputs_of_each_format_average_to_the_bytes_local_inputs_give(
    s3, runs, tmp_path, fmt
):
    client, recorder = s3
    files = runs["conv_bn"].files[fmt]
    put(client, files, f"formats/{fmt}")
    local_out, remote_out = tmp_path / f"local.{fmt}", tmp_path / f"remote.{fmt}"
    assert run_wavg("combine", *files, "-o", local_out)[0] == 0
    pattern = f"s3://{BUCKET}/formats/{fmt}/conv_bn_*.{fmt}"  # quoted: wavg lists the bucket
    code, out, err = run_wavg("combine", pattern, "-o", remote_out, "--json")
    assert code == 0, err
    assert remote_out.read_bytes() == local_out.read_bytes()
    summary = json.loads(out)
    assert [i["path"] for i in summary["inputs"]] == [
        f"s3://{BUCKET}/formats/{fmt}/{f.name}" for f in files
    ]
    requests, served = recorder.served(f"formats/{fmt}/")
    assert summary["bytes_fetched"] == served > 0
    assert summary["requests"] == requests  # (the glob's listing is a request to the bucket)


def test_only_the_averaged_tensors_and_metadata_are_fetched(s3, big_weights, tmp_path):
    client, recorder = s3
    files, tensor_bytes = big_weights
    urls = put(client, files, "big")
    out = tmp_path / "avg.weights.h5"
    code, stdout, err = run_wavg("combine", *urls, "-o", out, "--drop-optimizer", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    _, served = recorder.served("big/")
    assert summary["bytes_fetched"] == served
    averaged = tensor_bytes * len(files)
    total = sum(f.stat().st_size for f in files)
    assert averaged <= served <= 1.05 * averaged + len(files) * 8 * remote.PAGE
    assert served < 0.5 * total  # the optimizer state was never downloaded
    reference = tmp_path / "local.weights.h5"
    assert run_wavg("combine", *files, "-o", reference, "--drop-optimizer")[0] == 0
    # A rebuilt HDF5 skeleton carries creation times, so compare contents, not bytes.
    got, want = h5_tensors(out), h5_tensors(reference)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_an_output_url_is_uploaded_whole_and_alone(s3, runs, tmp_path):
    client, _ = s3
    files = runs["mlp"].files["keras"]
    local = tmp_path / "avg.keras"
    assert run_wavg("combine", *files, "-o", local)[0] == 0
    code, _, err = run_wavg("combine", *files, "-o", f"s3://{BUCKET}/out/avg.keras", "--dry-run")
    assert code == 0 and keys(client, "out/") == [], err  # a dry run uploads nothing
    code, out, err = run_wavg("combine", *files, "-o", f"s3://{BUCKET}/out/avg.keras")
    assert code == 0, err
    assert f"wrote s3://{BUCKET}/out/avg.keras" in out
    assert keys(client, "out/") == ["out/avg.keras"]  # no temporary object, ever
    assert get(client, "out/avg.keras") == local.read_bytes()


def test_remote_to_remote_with_a_missing_output_bucket_writes_nothing(s3, runs):
    client, recorder = s3
    urls = put(client, runs["mlp"].files["h5"], "r2r")
    code, _, err = run_wavg("combine", *urls, "-o", "s3://no-such-bucket-wavg/avg.h5")
    assert_one_line_error(code, err, "s3://no-such-bucket-wavg/avg.h5", "no such bucket")
    assert not [m for m, p, _ in recorder.log if m == "GET" and p.startswith(f"/{BUCKET}/r2r/")]


def test_an_object_overwritten_while_it_is_read_is_refused(s3, big_weights, tmp_path):
    client, _ = s3
    files, _ = big_weights
    urls = put(client, files, "changing")
    victim = f"/{BUCKET}/changing/{files[1].name}"
    fired = threading.Event()

    def overwrite(method, path, environ):
        span = environ.get("HTTP_RANGE", "")
        if method == "GET" and path == victim and span and not fired.is_set():
            first, last = (int(x) for x in span.split("=")[1].split("-"))
            if last - first + 1 > remote.SMALL_READ:  # a tensor read, not the metadata
                fired.set()
                client.put_object(Bucket=BUCKET, Key=victim.split("/", 2)[2], Body=b"x" * 9000)

    s3[1].hook = overwrite
    out = tmp_path / "avg.weights.h5"
    code, _, err = run_wavg("combine", *urls, "-o", out)
    assert fired.is_set()
    last = err.strip().splitlines()[-1]  # after the plan table: the object changed mid-run
    assert code == 1 and "Traceback" not in err
    assert last == f"wavg: error: {urls[1]}: changed while it was being read"
    assert not out.exists()


def test_transient_server_errors_are_retried(s3, runs, tmp_path):
    client, recorder = s3
    files = runs["mlp"].files["weights.h5"]
    urls = put(client, files, "flaky")
    recorder.failures, recorder.fail_prefix = remote.ATTEMPTS - 1, f"/{BUCKET}/flaky/"
    out, local = tmp_path / "avg.weights.h5", tmp_path / "local.weights.h5"
    code, _, err = run_wavg("combine", *urls, "-o", out)
    assert code == 0, err
    assert recorder.failures == 0
    assert run_wavg("combine", *files, "-o", local)[0] == 0
    assert out.read_bytes() == local.read_bytes()


def test_a_server_that_keeps_failing_is_one_line_after_bounded_retries(s3, runs, tmp_path):
    client, recorder = s3
    urls = put(client, runs["mlp"].files["h5"], "down")
    recorder.failures, recorder.fail_prefix = 1000, f"/{BUCKET}/down/"
    out = tmp_path / "avg.h5"
    code, _, err = run_wavg("combine", *urls, "-o", out)
    assert_one_line_error(code, err, urls[0], f"after {remote.ATTEMPTS} tries")
    assert 1000 - recorder.failures == remote.ATTEMPTS
    assert not out.exists()


def test_missing_credentials_are_one_line(s3, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    url = f"s3://{BUCKET}/any/model_1.h5"
    code, _, err = run_wavg("combine", url, "-o", tmp_path / "avg.h5")
    assert_one_line_error(code, err, url, "no credentials found")


def test_access_denied_names_the_url_and_never_a_credential(s3, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "DENIEDKEYID1234")
    url = f"s3://{BUCKET}/any/model_1.h5"
    code, out, err = run_wavg("combine", url, "-o", tmp_path / "avg.h5")
    assert_one_line_error(code, err, url, "access denied")
    assert SECRET not in err + out and "DENIEDKEYID1234" not in err + out


@pytest.mark.parametrize(
    ("url", "shown", "problem"),
    [
        (f"s3://{BUCKET}/none/model_1.h5", f"s3://{BUCKET}/none/model_1.h5", "no such object"),
        ("s3://no-such-bucket-wavg/model_1.h5", "s3://no-such-bucket-wavg/", "no such bucket"),
        (f"s3://{BUCKET}", f"s3://{BUCKET}", "not an object URL"),
        ("nosuchproto://host/model_1.h5", "nosuchproto://host/model_1.h5", "not a usable URL"),
        (
            f"s3://{BUCKET}/none/model_1.h5?X-Amz-Signature=abcSIGNATURE",
            f"s3://{BUCKET}/none/model_1.h5?***",
            "",
        ),
        (f"s3://{BUCKET}/none/model_*.h5", f"s3://{BUCKET}/none/model_*.h5", "no object matches"),
    ],
)
def test_bad_urls_are_one_line_errors_naming_them_without_secrets(
    s3, tmp_path, url, shown, problem
):
    code, out, err = run_wavg("combine", url, "-o", tmp_path / "avg.h5")
    assert_one_line_error(code, err, shown, problem)
    assert "SIGNATURE" not in err + out and SECRET not in err + out
    assert not (tmp_path / "avg.h5").exists()


def test_an_unreachable_endpoint_is_one_line_after_retries(s3, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", unused_endpoint())
    url = f"s3://{BUCKET}/any/model_1.h5"
    code, _, err = run_wavg("combine", url, "-o", tmp_path / "avg.h5")
    assert_one_line_error(code, err, url, "cannot reach the storage endpoint")


def test_a_url_whose_backend_is_missing_gets_the_pip_command(tmp_path):
    script = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from wavg.cli import main\n"
        f"sys.exit(main(['combine', 's3://b/run/m_1.h5', '-o', {str(tmp_path / 'a.h5')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert_one_line_error(
        done.returncode, done.stderr, "pip install '.[s3]' in wavg's source folder", exit_code=2
    )


def test_credentials_and_query_strings_never_show_in_a_url():
    url = "https://user:hunter2@host.example/run/model_7.h5?token=abc123"
    assert redact(url) == "https://***@host.example/run/model_7.h5?***"
    assert str(Url(url)) == redact(url) and "hunter2" not in repr(Url(url))
    assert Url(url).name == "model_7.h5"


def test_a_quoted_local_glob_is_expanded_when_no_file_has_that_name(tmp_path):
    for src in sorted(SAMPLES.glob("model_49[789].h5")):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    code, out, err = run_wavg(
        "combine", tmp_path / "model_49*.h5", "-o", tmp_path / "a.h5", "--json"
    )
    assert code == 0, err
    assert [i["epoch"] for i in json.loads(out)["inputs"]] == [497, 498, 499]
    code, _, err = run_wavg("combine", tmp_path / "model_5*.h5", "-o", tmp_path / "b.h5")
    assert_one_line_error(code, err, "model_5*.h5", "no file matches")


def test_a_file_literally_named_like_a_glob_is_taken_as_it_is(tmp_path):
    literal = tmp_path / "model_[1].h5"
    literal.write_bytes((SAMPLES / "model_491.h5").read_bytes())
    (tmp_path / "model_1.h5").write_bytes((SAMPLES / "model_490.h5").read_bytes())
    code, out, err = run_wavg("combine", literal, "-o", tmp_path / "a.h5", "--json")
    assert code == 0, err
    assert [i["path"] for i in json.loads(out)["inputs"]] == [str(literal)]


def test_evaluate_scores_remote_checkpoints_like_local_ones(s3):
    client, _ = s3
    files = sorted(SAMPLES.glob("model_49[89].h5"))
    urls = put(client, files, "evaluate")
    kwargs = {"schemes": ["equal"], "ensemble": False}
    there = evaluate(urls, **kwargs)
    here = evaluate(files, **kwargs)
    assert [str(p) for p in there.checkpoints] == urls
    assert there.scores == here.scores


def test_the_endpoint_may_come_from_fsspec_configuration(s3, runs, monkeypatch, tmp_path):
    import fsspec.config

    client, _ = s3
    urls = put(client, runs["mlp"].files["h5"], "conf")
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # what FSSPEC_S3_ENDPOINT_URL=... sets instead:
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    code, _, err = run_wavg("combine", *urls, "-o", tmp_path / "avg.h5")
    assert code == 0, err


@given(
    st.lists(st.tuples(st.integers(0, 1 << 22), st.integers(0, 1 << 20)), max_size=30),
    st.integers(1 << 10, 1 << 21),
)
def test_planned_chunks_cover_every_range_once_and_stay_within_their_size(ranges, size):
    # Tensors never overlap: keep the ranges disjoint, as an HDF5 file's datasets are.
    disjoint, end = [], 0
    for start, length in sorted(ranges):
        if start >= end:
            disjoint.append((start, length))
            end = start + length
    chunks = remote.plan_chunks(disjoint, seq=0, chunk=size)
    covered = sorted((c.start, c.end) for c in chunks)
    assert all(b <= c for (_, b), (c, _) in zip(covered, covered[1:], strict=False))
    assert all(0 < c.end - c.start <= size for c in chunks)
    assert sum(c.useful for c in chunks) == sum(length for _, length in disjoint)
    for start, length in disjoint:
        inside = sum(max(0, min(b, start + length) - max(a, start)) for a, b in covered)
        assert inside == length


def test_a_byte_source_opens_its_siblings_by_name(s3, runs):
    client, _ = s3
    files = runs["mlp"].files["h5"]
    urls = put(client, files, "siblings")
    for first in (open_source(urls[0]), open_source(files[0])):
        other = first.sibling(files[1].name)
        assert other.read_at(0, other.size) == files[1].read_bytes()


def test_a_failed_upload_leaves_no_object_and_names_the_output(s3, runs, tmp_path):
    client, recorder = s3
    files = runs["mlp"].files["h5"]
    target = f"s3://{BUCKET}/failing-out/avg.h5"
    recorder.failures, recorder.fail_prefix = 1000, f"/{BUCKET}/failing-out/"
    code, _, err = run_wavg("combine", *files, "-o", target)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"wavg: error: {target}: ")
    recorder.failures = 0
    assert keys(client, "failing-out/") == []


def test_local_runs_never_import_a_storage_backend(tmp_path):
    files = [str(p) for p in sorted(SAMPLES.glob("model_49[89].h5"))]
    script = (
        "import sys\n"
        "from wavg.cli import main\n"
        f"code = main(['combine', *{files!r}, '-o', {str(tmp_path / 'a.h5')!r}])\n"
        "loaded = [m for m in ('fsspec', 's3fs', 'gcsfs', 'botocore') if m in sys.modules]\n"
        "sys.exit(code or (3 if loaded else 0))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_empty_object_and_a_prefix_are_refused_by_name(s3, tmp_path):
    client, _ = s3
    client.put_object(Bucket=BUCKET, Key="odd/model_1.h5", Body=b"")
    client.put_object(Bucket=BUCKET, Key="odd/run_2/model_2.h5", Body=b"x")
    for url, problem in [
        (f"s3://{BUCKET}/odd/model_1.h5", "is empty"),
        (f"s3://{BUCKET}/odd/run_2", "not a checkpoint"),
    ]:
        code, _, err = run_wavg("combine", url, "-o", tmp_path / "avg.h5")
        assert_one_line_error(code, err, url, problem)


def test_an_output_url_that_is_an_input_is_refused_before_any_request(s3):
    _, recorder = s3
    urls = [f"s3://{BUCKET}/same/model_{i}.h5" for i in (1, 2)]
    code, _, err = run_wavg("combine", *urls, "-o", urls[1])
    assert_one_line_error(code, err, "inputs are never overwritten", exit_code=2)
    assert recorder.log == []


def test_sharded_checkpoints_sharded_differently_are_read_from_the_bucket(s3, multi, tmp_path):
    from support import multifile as hm

    client, recorder = s3
    files = [i for index in multi.sharded for i in (index, *hm.shard_names_paths(index))]
    put(client, files, "sharded")
    local_out, remote_out = tmp_path / "local.weights.json", tmp_path / "remote.weights.json"
    assert run_wavg("combine", *multi.sharded, "-o", local_out)[0] == 0
    pattern = f"s3://{BUCKET}/sharded/ep*.weights.json"  # the indexes, not their shards
    code, out, err = run_wavg("combine", pattern, "-o", remote_out, "--json")
    assert code == 0, err
    assert json.loads(out)["bytes_fetched"] == recorder.served("sharded/")[1] > 0
    local, remote = hm.sharded_tensors(local_out), hm.sharded_tensors(remote_out)
    assert local.keys() == remote.keys()
    for name, value in local.items():
        np.testing.assert_array_equal(remote[name], value, err_msg=name)

    newest = multi.sharded[-1]
    missing = hm.shard_names(newest)[1]
    client.delete_object(Bucket=BUCKET, Key=f"sharded/{missing}")
    failed = tmp_path / "failed.weights.json"
    code, _, err = run_wavg("combine", pattern, "-o", failed)
    assert_one_line_error(code, err, newest.name, missing)
    assert not failed.exists()


def test_chunked_compressed_tensors_are_fetched_ahead_not_chunk_by_chunk(s3, tmp_path):
    """h5py reads a chunked tensor chunk by chunk; their ranges are planned ahead instead, so
    adjacent chunks arrive coalesced in a few concurrent requests, not one request each."""
    import h5py

    client, recorder = s3
    rng = np.random.default_rng(5)
    files = []
    for epoch in range(3):
        path = tmp_path / f"chunked_{epoch}.weights.h5"
        with h5py.File(path, "w") as f:
            for layer in range(2):
                data = rng.standard_normal((512, 512)).astype(np.float32)
                f.create_dataset(
                    f"layers/dense_{layer}/vars/0", data=data, chunks=(64, 512), compression="gzip"
                )
        files.append(path)
    chunks = sum(
        f[f"layers/dense_{n}/vars/0"].id.get_num_chunks()
        for path in files
        for f in [h5py.File(path, "r")]
        for n in range(2)
    )
    urls = put(client, files, "chunked")
    out, local = tmp_path / "avg.weights.h5", tmp_path / "local.weights.h5"
    code, stdout, err = run_wavg("combine", *urls, "-o", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    requests, served = recorder.served("chunked/")
    assert summary["bytes_fetched"] == served and summary["requests"] == requests
    assert requests < chunks / 2  # (metadata and the global heap scan included)
    assert run_wavg("combine", *files, "-o", local)[0] == 0
    got, want = h5_tensors(out), h5_tensors(local)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
