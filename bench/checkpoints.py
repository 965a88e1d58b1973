"""Find or write the checkpoint files a cell needs, and remove them when no cell needs them.

Writing is done by ``keras_gen.py`` in a subprocess (one TensorFlow start-up per batch of
requests) so the harness never imports TensorFlow. A dataset lives in a directory named by
a hash of its model and seed, so ``--keep`` reruns reuse files only when they are the same.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from workloads import Dataset, checkpoint_name

BENCH_DIR = Path(__file__).resolve().parent
GENERATOR = BENCH_DIR / "keras_gen.py"


def dataset_dir(root: Path, dataset: Dataset) -> Path:
    """Directory of a dataset: its name plus a short hash of everything that shapes its bytes."""
    spec = json.dumps({"model": asdict(dataset.model), "seed": dataset.seed}, sort_keys=True)
    return root / "data" / f"{dataset.name}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def checkpoint_paths(root: Path, dataset: Dataset, fmt: str, n: int) -> list[Path]:
    """The first `n` checkpoints of a dataset in one format, oldest first."""
    directory = dataset_dir(root, dataset)
    return [directory / checkpoint_name(i, fmt) for i in range(n)]


def _job(root: Path, dataset: Dataset, fmt: str, n: int) -> dict | None:
    """A generator job for the missing tail of the first `n` files, or None if all exist."""
    paths = checkpoint_paths(root, dataset, fmt, n)
    missing = [i for i, path in enumerate(paths) if not path.exists()]
    if not missing:
        return None
    model = dataset.model
    return {
        "input_dim": model.input_dim,
        "units": list(model.units),
        "batchnorm": model.batchnorm,
        "application": model.application,
        "formats": [fmt],
        "start": missing[0],
        "stop": n,
        "seed": dataset.seed,
        "dir": str(dataset_dir(root, dataset)),
    }


def ensure(root: Path, requests: list[tuple[Dataset, str, int]]) -> float:
    """Make sure every (dataset, format, n) request exists on disk; returns seconds spent."""
    jobs = [job for request in requests if (job := _job(root, *request)) is not None]
    if not jobs:
        return 0.0
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(GENERATOR), json.dumps(jobs)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"checkpoint generation failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def remove(root: Path, dataset: Dataset) -> None:
    """Delete a dataset's directory (multi-GB for the big models) once no cell needs it."""
    shutil.rmtree(dataset_dir(root, dataset), ignore_errors=True)


def disk_needed(root: Path, dataset: Dataset, fmt: str, n: int) -> int:
    """Bytes still to write for a request (weights only; metadata is a rounding error)."""
    missing = sum(not p.exists() for p in checkpoint_paths(root, dataset, fmt, n))
    return missing * dataset.model.weight_bytes
