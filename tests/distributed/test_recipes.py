"""The launcher recipes of docs/distributed.md, run as written: a Slurm array, a Kubernetes
indexed Job, Ray tasks and Dask, all running the same ``wavg combine --part`` and
``wavg commit`` commands, each giving the single-process output bit for bit.

Each recipe's command lines are here verbatim (the doc test checks it); a launcher is
played by setting the variables it sets (``SLURM_ARRAY_TASK_ID``, ``JOB_COMPLETION_INDEX``)
for every index, or by the launcher itself (a local Ray instance, a Dask LocalCluster).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import keras3_formats as k3
from support import multifile as hm
from support import safety as hs

import wavg

SLURM_PARTS = """\
#!/bin/bash
#SBATCH --job-name=wavg-parts
#SBATCH --array=1-4
#SBATCH --cpus-per-task=2
wavg combine "$RUN/ckpt/m_?.weights.h5" -o "$RUN/avg.weights.json" --part "$SLURM_ARRAY_TASK_ID/4"
"""
SLURM_COMMIT = """\
#!/bin/bash
#SBATCH --job-name=wavg-commit
wavg commit "$RUN/avg.weights.json"
"""
K8S_PART = """\
wavg combine "$RUN/ckpt/m_?.weights.h5" -o "$RUN/avg.weights.json" --part "$((JOB_COMPLETION_INDEX + 1))/4"
"""
K8S_COMMIT = """\
wavg commit "$RUN/avg.weights.json"
"""
RAY = """\
import os
import subprocess

import ray

RUN = os.environ["RUN"]
PARTS = 4


@ray.remote(num_cpus=1)
def part(i):
    subprocess.run(
        ["wavg", "combine", f"{RUN}/ckpt/m_?.weights.h5", "-o", f"{RUN}/avg.weights.json",
         "--part", f"{i}/{PARTS}"],
        check=True,
    )


ray.init()
ray.get([part.remote(i) for i in range(1, PARTS + 1)])
subprocess.run(["wavg", "commit", f"{RUN}/avg.weights.json"], check=True)
"""
DASK = """\
wavg combine "$RUN/ckpt/m_?.weights.h5" -o "$RUN/avg.weights.json" --dask local:2
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory, keras_module):
    return k3.save_run(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "avg.weights.json"
    wavg.combine(files["weights.h5"], out)
    return hm.sharded_tensors(out)


@pytest.fixture
def run(files, tmp_path) -> Path:
    """``$RUN``: a run folder whose ``ckpt/`` holds the checkpoints."""
    (tmp_path / "ckpt").mkdir()
    for path in files["weights.h5"]:
        (tmp_path / "ckpt" / path.name).symlink_to(path)
    return tmp_path


def environment(run: Path, **extra: str) -> dict[str, str]:
    """`wavg` on PATH (the venv's) and the launcher's variables."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "RUN": str(run), **extra}


def shell(script: str, env: dict[str, str]) -> None:
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def assert_output(run: Path, reference: dict) -> None:
    out = run / "avg.weights.json"
    got = hm.sharded_tensors(out)
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        assert got[name].tobytes() == value.tobytes(), name
    names = {p.name for p in run.iterdir()}
    assert names == {"ckpt", out.name, "avg_00000.weights.h5", *hm.shard_names(out)}


def test_the_slurm_array_recipe(run, reference):
    for task in range(1, 5):
        shell(SLURM_PARTS, environment(run, SLURM_ARRAY_TASK_ID=str(task)))
    shell(SLURM_COMMIT, environment(run))
    assert_output(run, reference)


def test_the_kubernetes_indexed_job_recipe(run, reference):
    for index in (3, 0, 2, 1):  # pods finish in any order
        shell(K8S_PART, environment(run, JOB_COMPLETION_INDEX=str(index)))
    shell(K8S_COMMIT, environment(run))
    assert_output(run, reference)


@pytest.mark.slow
def test_the_ray_recipe(run, reference, tmp_path_factory):
    script = tmp_path_factory.mktemp("ray") / "recipe.py"
    script.write_text(RAY)
    env = environment(run, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_output(run, reference)


def test_the_dask_recipe(run, reference):
    shell(DASK, environment(run))
    assert_output(run, reference)
    assert hs.leftovers(run) == []
