"""Remote workload: average 8 checkpoints of ~110 MB straight from an S3 endpoint.

An S3 server (moto's, on 127.0.0.1) holds eight Keras-written ``.weights.h5`` files. In one
run this measures ``wavg combine s3://... -o local`` (wall time, and bytes fetched as wavg
reports them in ``--json``) against downloading the same eight objects in parallel with the
same client (s3fs ``get``), and reports the two ratios the targets are about: bytes fetched /
tensor bytes averaged (target <= 1.05) and wavg time / download time (target <= 1.5).

Run alone with ``python bench/remote_workload.py [--out DIR]``; ``make bench`` runs it last.
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
from workloads import Dataset, Model

REMOTE = Dataset("remote-110MB", Model("mlp-110MB", input_dim=4096, units=(4096, 2560)), 7000)
FILES = 8
BUCKET = "wavg-bench"
REPEATS = int(os.environ.get("WAVG_BENCH_REPEATS", "2"))


def _server_env() -> tuple[object, dict[str, str]]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return server, env


def _download_seconds(urls: list[str], directory: Path) -> float:
    """Wall time of s3fs downloading every object in parallel (one batched `get`)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fs.get(urls, [str(directory / u.rsplit("/", 1)[1]) for u in urls])
    seconds = time.perf_counter() - started
    shutil.rmtree(directory)
    return seconds


def _wavg_run(wavg: Path, urls: list[str], out: Path, env: dict[str, str]) -> tuple[float, dict]:
    """Wall time and ``--json`` summary of one remote combine, plus its peak RSS (bytes,
    under GNU time when present) as ``summary["peak_rss"]``."""
    rss_file = out.with_suffix(".rss")
    timer = (
        ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] if Path("/usr/bin/time").exists() else []
    )
    started = time.perf_counter()
    done = subprocess.run(
        [*timer, str(wavg), "combine", *urls, "-o", str(out), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"wavg failed on the remote workload:\n{done.stderr[-2000:]}")
    out.unlink()
    summary = json.loads(done.stdout)
    if timer:
        summary["peak_rss"] = int(rss_file.read_text().split()[-1]) * 1024
    return seconds, summary


def run(root: Path, wavg: Path, keep: bool = False) -> list[str]:
    """Measure the remote workload; returns the lines for the closing note. The generated
    checkpoints are deleted afterwards unless `keep`."""
    checkpoints.ensure(root, [(REMOTE, "weights", FILES)])
    files = checkpoints.checkpoint_paths(root, REMOTE, "weights", FILES)
    size = sum(p.stat().st_size for p in files)
    server, env = _server_env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for path in files:
            client.upload_file(str(path), BUCKET, f"run/{path.name}")
        urls = [f"s3://{BUCKET}/run/{p.name}" for p in files]
        scratch = Path(tempfile.mkdtemp(prefix="wavg-remote-bench-", dir=root))
        downloads, runs = [], []
        for _ in range(REPEATS):  # interleaved, so both see the same machine load
            downloads.append(_download_seconds(urls, scratch / "download"))
            runs.append(_wavg_run(wavg, urls, scratch / "avg.weights.h5", env))
        shutil.rmtree(scratch, ignore_errors=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
        if not keep:
            checkpoints.remove(root, REMOTE)
    download = min(downloads)
    seconds, summary = min(runs, key=lambda r: r[0])
    tensor_bytes = summary["bytes_read"]  # averaged tensor bytes over all inputs
    return [
        f"remote: {FILES} x {size / FILES / 1e6:.0f} MB .weights.h5 on an S3 server (moto, "
        f"127.0.0.1): bytes fetched / tensor bytes = {summary['bytes_fetched'] / tensor_bytes:.3f} "
        f"(target <= 1.05; {summary['requests']} requests); wavg time / parallel download "
        f"time = {seconds / download:.2f} ({seconds:.1f} s vs {download:.1f} s; target <= 1.5)"
        + (f"; peak RSS {summary['peak_rss'] / 1e6:.0f} MB" if "peak_rss" in summary else "")
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args()
    wavg = Path(sys.executable).parent / "wavg"
    for line in run(args.out, wavg, args.keep):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
