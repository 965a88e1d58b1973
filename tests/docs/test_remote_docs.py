"""The commands of docs/remote.md, run as printed against the real moto S3 server.

The doc test (test_docs.py) cannot give a page a bucket, so docs/remote.md's bucket block is
marked as carried by this file: each of its command lines appears verbatim below, and runs
here with `wavg` on PATH, in a directory holding sample_checkpoints/, against a bucket named
`bucket` that holds those checkpoints under run/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_checkpoints"

COMMANDS = [
    'wavg combine "s3://bucket/run/model_49*.h5" -o s3://bucket/run/avg.h5',
    'wavg combine "s3://bucket/run/model_49*.h5" -o avg.h5',
    "wavg combine sample_checkpoints/model_49*.h5 -o s3://bucket/run/avg_local.h5",
    'wavg combine --json --last 3 "s3://bucket/run/model_49*.h5" -o s3://bucket/run/avg3.h5',
]


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


def _kernel(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return np.asarray(f["model_weights/hidden/case_study/hidden/kernel"])


def test_the_documented_bucket_commands_run_as_printed(s3, tmp_path: Path) -> None:
    client, _ = s3
    client.create_bucket(Bucket="bucket")
    for sample in sorted(SAMPLES.glob("model_49*.h5")):
        client.upload_file(str(sample), "bucket", f"run/{sample.name}")
    shutil.copytree(SAMPLES, tmp_path / "sample_checkpoints")

    results = [_run(command, tmp_path) for command in COMMANDS]
    for command, done in zip(COMMANDS, results, strict=True):
        assert done.returncode == 0, f"{command}: {done.stderr}"

    keys = {o["Key"] for o in client.list_objects_v2(Bucket="bucket", Prefix="run/")["Contents"]}
    assert {"run/avg.h5", "run/avg_local.h5", "run/avg3.h5"} <= keys
    client.download_file("bucket", "run/avg.h5", str(tmp_path / "from_bucket.h5"))
    local_in = tmp_path / "local_in.h5"
    client.download_file("bucket", "run/avg_local.h5", str(local_in))
    # remote in or local in, remote out or local out: the same average
    assert np.array_equal(_kernel(tmp_path / "from_bucket.h5"), _kernel(tmp_path / "avg.h5"))
    assert np.array_equal(_kernel(local_in), _kernel(tmp_path / "avg.h5"))
    summary = json.loads(results[3].stdout)
    assert [i["epoch"] for i in summary["inputs"]] == [497, 498, 499]
    assert summary["bytes_fetched"] > 0 and summary["requests"] > 0


ORBAX_COMMAND = "wavg combine ckpt --last 3 -o ckpt_avg"


@pytest.mark.slow
def test_the_documented_orbax_command_runs_as_printed(orbax_roots, tmp_path: Path) -> None:
    pytest.importorskip("tensorstore")
    shutil.copytree(orbax_roots / "jax" / "functional", tmp_path / "ckpt", symlinks=True)
    done = _run(ORBAX_COMMAND, tmp_path)
    assert done.returncode == 0, done.stderr
    newest = max(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert [p.name for p in (tmp_path / "ckpt_avg").iterdir()] == [str(newest)]
