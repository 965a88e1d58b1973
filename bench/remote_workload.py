"""Remote workload: 8 real-architecture checkpoints averaged straight from an S3 endpoint
that is made to look far away (a round-trip delay and a rate-limited link).

An S3 server (moto's, on 127.0.0.1) holds eight Keras-written ``.h5`` checkpoints of a
``keras.applications`` model (ResNet50 by default: ~100 MB each, hundreds of tensors whose
HDF5 headers lie between them). The server is reached through the tests' delaying proxy
(``tests/support/latency_proxy.py``): every request/response turn waits the round-trip
delay, and the bytes served share one link of ``--rate`` MB/s. At each delay this measures
``wavg combine s3://... -o local --json`` (wall time, bytes fetched, peak RSS) against a
plain parallel download of the same eight objects through the same proxy (s3fs ``get``),
and reports wavg time / download time (target <= 1.2), bytes fetched / tensor bytes
averaged (target <= 1.05) and peak RSS (target <= 300 MB).

Run alone with ``python bench/remote_workload.py [--out DIR] [--model NAME]
[--delays 0,10,35,100] [--rate MBPS]``; ``make bench`` runs it last with the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import checkpoints
from workloads import D_APPS, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.latency_proxy import LatencyProxy  # noqa: E402 (the tests' own proxy)

FILES = 8
FORMAT = "h5"
BUCKET = "wavg-bench"
DELAYS_MS = (0, 10, 35, 100)
RATE_MBPS = 125.0  # 1 Gbit/s
REPEATS = int(os.environ.get("WAVG_BENCH_REPEATS", "1"))
DATASETS = {d.model.name: d for d in D_APPS}


def _serve_ranges_without_copying_objects() -> None:
    """moto reads a whole object (from a temporary file over 5 MB) for every request, even
    a ranged GET of 16 KB; S3 does not. Each object's bytes are kept in memory, read once,
    so a request costs what it serves: the benchmark measures wavg's requests, not moto's."""
    from moto.s3.models import FakeKey

    read, write = FakeKey.value.fget, FakeKey.value.fset

    def value(key: FakeKey) -> bytes:
        if "_bench_value" not in key.__dict__:
            key.__dict__["_bench_value"] = read(key)
        return key.__dict__["_bench_value"]

    def set_value(key: FakeKey, new: bytes) -> None:
        key.__dict__.pop("_bench_value", None)
        write(key, new)

    FakeKey.value = property(value, set_value)


def _server_env() -> tuple[object, dict[str, str]]:
    import logging

    from moto.server import ThreadedMotoServer

    _serve_ranges_without_copying_objects()

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


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """The bench's S3 server, with this process's environment pointed at it while it runs:
    yields the variables it sets, which are put back (and the server stopped) on exit."""
    server, env = _server_env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _download_seconds(urls: list[str], directory: Path, endpoint: str) -> float:
    """Wall time of s3fs downloading every object in parallel (one batched `get`)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
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


def _row(delay_ms: float, download: float, seconds: float, summary: dict) -> str:
    tensor_bytes = summary["bytes_read"]  # averaged tensor bytes over all inputs
    rss = f"{summary['peak_rss'] / 1e6:.0f} MB" if "peak_rss" in summary else "n/a"
    return (
        f"| {delay_ms:g} ms | {download:.1f} s | {seconds:.1f} s | {seconds / download:.2f} | "
        f"{summary['bytes_fetched'] / tensor_bytes:.3f} | {summary['requests']} | {rss} |"
    )


def run(
    root: Path,
    wavg: Path,
    keep: bool = False,
    dataset: Dataset = DATASETS["resnet50"],
    delays_ms: tuple[float, ...] = DELAYS_MS,
    rate_mbps: float | None = RATE_MBPS,
) -> list[str]:
    """Measure the remote workload at each delay; returns the lines for the closing note (a
    Markdown table). The generated checkpoints are deleted afterwards unless `keep`."""
    checkpoints.ensure(root, [(dataset, FORMAT, FILES)])
    files = checkpoints.checkpoint_paths(root, dataset, FORMAT, FILES)
    size = sum(p.stat().st_size for p in files)
    rows = []
    try:
        with s3_server() as env:
            import boto3

            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            for path in files:
                client.upload_file(str(path), BUCKET, f"run/{path.name}")
            urls = [f"s3://{BUCKET}/run/{p.name}" for p in files]
            scratch = Path(tempfile.mkdtemp(prefix="wavg-remote-bench-", dir=root))
            rate = rate_mbps * 1e6 if rate_mbps else None
            for delay_ms in delays_ms:
                with LatencyProxy(
                    env["AWS_ENDPOINT_URL"], delay=delay_ms / 1000, rate=rate
                ) as link:
                    shaped = {**env, "AWS_ENDPOINT_URL": link.url}
                    downloads, runs = [], []
                    for _ in range(REPEATS):  # interleaved, so both see the same machine load
                        downloads.append(_download_seconds(urls, scratch / "download", link.url))
                        runs.append(_wavg_run(wavg, urls, scratch / "avg.h5", shaped))
                seconds, summary = min(runs, key=lambda r: r[0])
                rows.append(_row(delay_ms, min(downloads), seconds, summary))
                print(rows[-1], file=sys.stderr)
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if not keep:
            checkpoints.remove(root, dataset)
    link = f"{rate_mbps:g} MB/s link" if rate_mbps else "no rate limit"
    return [
        f"remote: {FILES} x {size / FILES / 1e6:.0f} MB {dataset.model.name} .{FORMAT} on an S3 "
        f"server (moto, 127.0.0.1) behind the tests' delaying proxy, {link}; targets: wavg / "
        "download <= 1.2, bytes fetched / tensor bytes <= 1.05, peak RSS <= 300 MB",
        "",
        "| round trip | download | wavg | wavg / download | fetched / tensor bytes | requests "
        "| peak RSS |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--model", choices=sorted(DATASETS), default="resnet50")
    parser.add_argument(
        "--delays", default=",".join(map(str, DELAYS_MS)), help="ms, comma-separated"
    )
    parser.add_argument("--rate", type=float, default=RATE_MBPS, help="MB/s; 0: no limit")
    args = parser.parse_args()
    wavg = Path(sys.executable).parent / "wavg"
    delays = tuple(float(d) for d in args.delays.split(",") if d)
    lines = run(args.out, wavg, args.keep, DATASETS[args.model], delays, args.rate or None)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
