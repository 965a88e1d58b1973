"""Distributed workload: the remote workload's checkpoints averaged in parts and on Dask.

The eight ``.weights.h5`` files of `remote_workload` sit on an S3 server (moto, 127.0.0.1).
In one run this measures, against a single-process ``combine -o avg.weights.json``:

- ``--part I/4`` run one after another: the bytes each part fetched over its tensor bytes
  (target <= 1.05, metadata included) and all parts' bytes over the single run's (<= 1.10);
- ``--dask local:K`` for K = 1, 2, 4: wall time, and the coordinator's peak RSS (the ``wavg``
  process alone, read from /proc while it runs; its workers are other processes), which must
  stay flat in the model size: it reads no tensor.

On one machine the workers share one link and its cores, so K > cores cannot speed up; the
note says so. Run alone with ``python bench/distributed.py [--out DIR] [--small]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkpoints
import remote_workload
from workloads import Dataset, Model

PARTS = 4
WORKERS = (1, 2, 4)
# `--small`: the same shape of workload at a quarter of the bytes, for a quick look.
# 8 x 109 MB .weights.h5 of a wide MLP: few, large tensors, so each part's share is clear.
MLP_110MB = Dataset("remote-110MB", Model("mlp-110MB", input_dim=4096, units=(4096, 2560)), 7000)
SMALL = Dataset("remote-28MB", Model("mlp-28MB", input_dim=2048, units=(2048, 1280)), 7001)


def _measured(command: list[str], env: dict[str, str]) -> tuple[float, dict, int]:
    """Wall time, ``--json`` summary and peak RSS (bytes, the process itself: VmHWM, read
    from /proc until it exits) of one wavg command."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{stderr[-2000:]}")
    return seconds, json.loads(stdout) if stdout.strip() else {}, peak


def run(root: Path, wavg: Path, keep: bool = False, dataset: Dataset = MLP_110MB) -> list[str]:
    """Measure the distributed workload; returns the lines for the closing note."""
    files_n = remote_workload.FILES
    checkpoints.ensure(root, [(dataset, "weights", files_n)])
    files = checkpoints.checkpoint_paths(root, dataset, "weights", files_n)
    size = sum(p.stat().st_size for p in files)
    scratch = Path(tempfile.mkdtemp(prefix="wavg-distributed-bench-", dir=root))
    for folder in ("single", "parts", *(f"dask{k}" for k in WORKERS)):
        (scratch / folder).mkdir()
    try:
        with remote_workload.s3_server() as env:
            full_env = {**os.environ, **env}
            import boto3

            client = boto3.client("s3")
            client.create_bucket(Bucket=remote_workload.BUCKET)
            for path in files:
                client.upload_file(str(path), remote_workload.BUCKET, f"dist/{path.name}")
            urls = [f"s3://{remote_workload.BUCKET}/dist/{p.name}" for p in files]
            combine = [str(wavg), "combine", *urls, "--json", "-o"]
            single_s, single, single_rss = _measured(
                [*combine, str(scratch / "single" / "avg.weights.json")], full_env
            )
            parts = []
            out = scratch / "parts" / "avg.weights.json"
            for index in range(1, PARTS + 1):
                parts.append(
                    _measured([*combine, str(out), "--part", f"{index}/{PARTS}"], full_env)
                )
            commit_s, _, commit_rss = _measured([str(wavg), "commit", str(out), "--json"], full_env)
            dask = {}
            for workers in WORKERS:
                target = scratch / f"dask{workers}" / "avg.weights.json"
                dask[workers] = _measured(
                    [*combine, str(target), "--dask", f"local:{workers}"], full_env
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not keep:
            checkpoints.remove(root, dataset)
    tensor = [s["bytes_read"] for _, s, _ in parts]  # averaged tensor bytes, all inputs
    extra = [s["bytes_fetched"] - t for (_, s, _), t in zip(parts, tensor, strict=True)]
    ratios = [s["bytes_fetched"] / t for (_, s, _), t in zip(parts, tensor, strict=True) if t]
    fetched = sum(s["bytes_fetched"] for _, s, _ in parts)
    walls = ", ".join(f"{k} worker{'s' * (k > 1)} {dask[k][0]:.1f} s" for k in WORKERS)
    peaks = ", ".join(f"{dask[k][2] / 1e6:.0f} MB" for k in WORKERS)
    return [
        f"distributed: {files_n} x {size / files_n / 1e6:.0f} MB .weights.h5 on an S3 server "
        f"(moto, 127.0.0.1), output .weights.json in {PARTS} parts: tensor bytes per part "
        f"{', '.join(f'{t / 1e6:.1f}' for t in tensor)} MB, fetched beyond them "
        f"{', '.join(f'{e / 1e3:.0f}' for e in extra)} kB (metadata; fetched / tensor bytes "
        f"{min(ratios):.3f}-{max(ratios):.3f}, target <= 1.05 + metadata); all parts "
        f"{fetched / single['bytes_fetched']:.3f} x a single run's bytes (target <= 1.10); "
        f"single run {single_s:.1f} s, peak RSS {single_rss / 1e6:.0f} MB; parts "
        f"{', '.join(f'{p[0]:.1f}' for p in parts)} s, peak RSS "
        f"{', '.join(f'{p[2] / 1e6:.0f}' for p in parts)} MB; commit {commit_s:.1f} s "
        f"({commit_rss / 1e6:.0f} MB); --dask local:K wall {walls} (cluster start included); "
        f"coordinator peak RSS {peaks}"
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--small", action="store_true", help="a 28 MB model instead of 110 MB")
    args = parser.parse_args()
    wavg = Path(sys.executable).parent / "wavg"
    dataset = SMALL if args.small else MLP_110MB
    for line in run(args.out, wavg, args.keep, dataset):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
