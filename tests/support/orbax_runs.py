"""Orbax roots written by Keras' own OrbaxCheckpoint, and a reader that is not wavg's.

Keras trains and reloads in subprocesses (`orbax_keras_job.py`), one per backend, since the
backend is fixed at import; arrays are read back with TensorStore alone. Importing this module
needs neither TensorStore nor Keras.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import numpy as np

JOB = Path(__file__).with_name("orbax_keras_job.py")
REPO = JOB.resolve().parents[2]
KINDS = {"jax": ("functional", "sequential", "bf16"), "tensorflow": ("functional", "sequential")}


def keras_jobs(*jobs: tuple[str, ...]) -> None:
    """Run ``orbax_keras_job.py`` once per ``(backend, *args)``, all at once."""
    with contextlib.ExitStack() as stack:
        # Logs go to files: a pipe could fill up and block a job while another is awaited.
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in jobs]
        running = [_start(log, *job) for log, job in zip(logs, jobs, strict=True)]
        for process, log in zip(running, logs, strict=True):
            process.wait(timeout=600)
            log.seek(0)
            assert process.returncode == 0, log.read()[-3000:].decode(errors="replace")


def _start(log: IO[bytes], backend: str, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "JAX_PLATFORMS": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.Popen(
        [sys.executable, str(JOB), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def train_roots(base: Path) -> Path:
    """``base/<backend>/<kind>``: OrbaxCheckpoint roots of 4 epochs (steps 0-3), every step
    kept, for each backend and kind of `KINDS`; and ``<kind>-default`` with Keras' default
    ``max_to_keep``."""
    keras_jobs(*((backend, "train", str(base / backend)) for backend in KINDS))
    return base


def store_spec(step: Path, name: str) -> dict:
    base = {"driver": "file", "path": f"{step}/pytree/"}
    return {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": base, "path": f"{name}/"}}


def read_array(step: Path, name: str) -> np.ndarray:
    import tensorstore as ts

    return ts.open(store_spec(step, name)).result().read().result()


def array_names(step: Path) -> list[str]:
    tree = json.loads((step / "pytree" / "_METADATA").read_text())["tree_metadata"]
    return [
        ".".join(k["key"] for k in v["key_metadata"])
        for v in tree.values()
        if not v["value_metadata"].get("skip_deserialize")  # an empty container
    ]
