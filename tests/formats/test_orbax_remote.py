"""Orbax roots in a bucket, read through TensorStore's s3 driver from a real HTTP S3 endpoint
(moto's standalone server on 127.0.0.1, dummy credentials), against the same steps on disk.

The steps are written by Keras itself (``OrbaxCheckpoint`` under JAX, see
`orbax_keras_job.py`) and uploaded object by object, as ``aws s3 cp --recursive`` would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.kerasfiles import assert_one_line_error, run_wavg
from support.orbax_runs import array_names, read_array
from support.remote import BUCKET, SECRET, unused_endpoint

from wavg.storage import remote

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_roots(orbax_roots) -> Path:
    """``jax/<kind>``: OrbaxCheckpoint roots of 4 epochs written by Keras on JAX."""
    return orbax_roots / "jax"


@pytest.fixture
def s3(s3):
    """conftest's moto server (its recorder answers the key id DENIED... with a 403); these
    tests need only its client."""
    client, _ = s3
    return client


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """A new s3fs client per test (it reads the environment) and quick retries."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)


def upload(client, root: Path, prefix: str) -> str:
    """Put every file of `root` under `prefix`; return the prefix's URL."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(root).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


def _metadata_files(step: Path) -> dict[str, bytes]:
    """The files of a step but its OCDBT data files (named at random when written) and
    commit markers (which name the output)."""
    return {
        p.relative_to(step).as_posix(): p.read_bytes()
        for p in step.rglob("*")
        if p.is_file() and p.parent.name != "d" and p.name != "commit_success.txt"
    }


def assert_same_step(got: Path, want: Path) -> None:
    """Two output steps hold the same metadata and arrays equal in value and dtype."""
    assert _metadata_files(got).keys() == _metadata_files(want).keys()
    for name, data in _metadata_files(want).items():
        if not name.endswith("manifest.ocdbt"):  # (it holds the new store's identity)
            assert _metadata_files(got)[name] == data, name
    names = array_names(want)
    assert array_names(got) == names and names
    for name in names:
        mine, theirs = read_array(got, name), read_array(want, name)
        assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs), name


def test_a_root_in_a_bucket_averages_to_the_arrays_the_same_root_on_disk_gives(
    s3, local_roots, tmp_path
):
    root = local_roots / "functional"
    url = upload(s3, root, "run/functional")
    code, stdout, stderr = run_wavg(
        "combine", url, "--last", "3", "-o", tmp_path / "remote", "--json"
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert [i["path"] for i in summary["inputs"]] == [f"{url}/{n}" for n in (1, 2, 3)]
    assert summary["format"] == "orbax" and summary["tensors"] > 0
    assert run_wavg("combine", root, "--last", "3", "-o", tmp_path / "local")[0] == 0
    assert [p.name for p in (tmp_path / "remote").iterdir()] == ["3"]
    assert_same_step(tmp_path / "remote" / "3", tmp_path / "local" / "3")
    assert not np.array_equal(
        read_array(tmp_path / "remote" / "3", "trainable_variables.d1.kernel"),
        read_array(root / "3", "trainable_variables.d1.kernel"),
    )


def test_step_urls_can_be_given_one_by_one_and_with_drop_optimizer(s3, local_roots, tmp_path):
    root = local_roots / "sequential"
    url = upload(s3, root, "run/sequential")
    out = tmp_path / "remote"
    code, _, stderr = run_wavg("combine", f"{url}/3", f"{url}/0", "--drop-optimizer", "-o", out)
    assert code == 0, stderr
    local = tmp_path / "local"
    assert run_wavg("combine", root / "3", root / "0", "--drop-optimizer", "-o", local)[0] == 0
    assert_same_step(out / "3", local / "3")
    assert not [n for n in array_names(out / "3") if n.startswith("optimizer_variables")]


def test_unfinished_steps_in_a_bucket_are_skipped_and_reported(s3, local_roots, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(local_roots / "functional", root)
    shutil.copytree(root / "3", root / "4.orbax-checkpoint-tmp")
    shutil.copytree(root / "3", root / "5")
    (root / "5" / "commit_success.txt").unlink()
    url = upload(s3, root, "run/unfinished")
    code, stdout, stderr = run_wavg("combine", url, "--last", "2", "-o", tmp_path / "out", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert [Path(i["path"]).name for i in summary["inputs"]] == ["2", "3"]
    assert [w.split(": ")[0] for w in summary["warnings"]] == [
        f"{url}/4.orbax-checkpoint-tmp",
        f"{url}/5",
    ]


def test_a_bucket_root_with_one_step_names_max_to_keep(s3, local_roots, tmp_path):
    url = upload(s3, local_roots / "functional-default", "run/default")
    code, _, stderr = run_wavg("combine", url, "-o", tmp_path / "out")
    assert_one_line_error(code, stderr, url, "max_to_keep")
    assert not list(tmp_path.iterdir())


def test_the_endpoint_may_come_from_fsspec_configuration(s3, local_roots, monkeypatch, tmp_path):
    import fsspec.config

    url = upload(s3, local_roots / "functional", "run/conf")
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # what FSSPEC_S3_ENDPOINT_URL=... sets instead:
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    code, _, stderr = run_wavg("combine", url, "-o", tmp_path / "out")
    assert code == 0, stderr


def _refused(tmp_path: Path, *args: str, words: tuple[str, ...], exit_code: int = 1) -> None:
    code, stdout, stderr = run_wavg("combine", *args, "-o", tmp_path / "out")
    assert_one_line_error(code, stderr, *words, exit_code=exit_code)
    assert SECRET not in stdout + stderr and "DENIEDKEY" not in stdout + stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_missing_bucket_is_one_line_naming_the_url(s3, tmp_path):
    url = "s3://no-such-bucket-wavg-orbax/run/ckpt"
    _refused(tmp_path, url, words=(url, "no such bucket"))


def test_a_missing_step_is_one_line_naming_its_url(s3, local_roots, tmp_path):
    url = upload(s3, local_roots / "functional", "run/missing")
    _refused(tmp_path, f"{url}/1", f"{url}/7", words=(f"{url}/7",))


def test_an_unreachable_endpoint_is_one_line_after_bounded_retries(s3, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", unused_endpoint())
    url = f"s3://{BUCKET}/run/functional"
    _refused(tmp_path, url, words=(url, "cannot reach the storage endpoint"))


def test_denied_access_is_one_line_and_shows_no_credential(s3, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "DENIEDKEY12345")
    url = f"s3://{BUCKET}/run/functional"
    _refused(tmp_path, url, words=(url, "access denied"))


def test_missing_credentials_are_one_line(s3, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    url = f"s3://{BUCKET}/run/functional"
    _refused(tmp_path, url, words=(url, "no credentials found"))


def test_tensorstore_logs_nothing_on_stderr_beside_wavgs_own_lines(s3, local_roots, tmp_path):
    """TensorStore's AWS layer logs to the process's stderr (not Python's): a run from a
    bucket must leave only wavg's plan table there, and a failure only its one line."""
    url = upload(s3, local_roots / "functional", "run/quiet")
    command = [sys.executable, "-m", "wavg.cli", "combine"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [*command, url, "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert not re.search(r"^[IWEF]\d{4} ", done.stderr, re.M), done.stderr
    missing = f"s3://{BUCKET}-missing/run/quiet"
    done = subprocess.run(
        [*command, missing, "-o", str(tmp_path / "out2")], capture_output=True, text=True, env=env
    )
    assert_one_line_error(done.returncode, done.stderr, missing, "no such bucket")
