"""Run the N parts of a sharded output as tasks on a Dask distributed cluster, then commit.

The coordinator plans and checks the inputs (metadata only), sends part I of N to the
cluster as one task each (`run_plan(..., part=(I, N))`), and commits once all are in
(`partition.commit`). A worker lost mid-run is Dask's to retry: a part's writes land under
names its plan fixes, so a rerun is harmless, and nothing is committed unless every part
finished. Dask is imported here only, and only when a run asks for it; the coordinator never
reads a tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from wavg.averaging.engine import CombinePlan, CombineSummary, run_plan
from wavg.averaging.partition import commit
from wavg.errors import UsageError, WavgError
from wavg.extras import missing_reported, require
from wavg.storage.locations import Location, as_location

LOCAL = "local:"
# How long a client waits for a remote scheduler, and for its first worker.
CONNECT_SECONDS = 60


def combine_on_dask(
    plan: CombinePlan,
    out: str | os.PathLike[str],
    address: str,
    *,
    allow_nonfinite: bool = False,
    drop_optimizer: bool = False,
    max_shard_gb: float | None = None,
    parts: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_ready: Callable[[CombineSummary], None] | None = None,
) -> CombineSummary:
    """Average `plan` into the sharded output `out` with the cluster at `address`
    (``tcp://host:port``, or ``local:K`` for K worker processes on this machine, on
    127.0.0.1 only, dashboard off) and return the summary a local run would.

    `parts` defaults to the cluster's worker threads. `progress(done, total)` counts parts.
    The inputs are checked here first (one line, nothing sent, on a bad one); a part that
    fails fails the run with its one line, and the previous output stays as it was.
    """
    started = time.perf_counter()
    require("dask", "--dask")
    options = {
        "allow_nonfinite": allow_nonfinite,
        "drop_optimizer": drop_optimizer,
        "max_shard_gb": max_shard_gb,
    }
    summary = run_plan(plan, out, dry_run=True, part=(1, 1), on_ready=on_ready, **options)
    summary.part = None
    run = uuid.uuid4().hex[:8]
    # Workers may run elsewhere (another directory, a shared file system): absolute paths.
    shared = dataclasses.replace(plan, inputs=[_absolute(p) for p in plan.inputs])
    target = _absolute(as_location(out))
    with _client(address) as client:
        count = parts or _slots(client)
        futures = [
            client.submit(run_part, shared, target, (i, count), options, key=f"wavg-{run}-part-{i}")
            for i in range(1, count + 1)
        ]
        results = _gather(client, futures, count, progress)
    done = commit(out)
    summary.dry_run = False
    summary.bytes_read = sum(r["bytes_read"] for r in results)
    summary.bytes_fetched = sum(r["bytes_fetched"] for r in results)
    summary.requests = sum(r["requests"] for r in results)
    summary.bytes_written = done.bytes_written
    summary.warnings.extend(dict.fromkeys(w for r in results for w in r["warnings"]))
    summary.seconds = time.perf_counter() - started
    return summary


def _absolute(location: Location) -> Location:
    return location.absolute() if isinstance(location, Path) else location


def run_part(
    plan: CombinePlan, out: Location, part: tuple[int, int], options: dict[str, Any]
) -> dict[str, Any]:
    """One task: part `part` of the output (on a worker). A `WavgError` comes back as data
    (its line and exit code), so the coordinator reports it as a local run would."""
    try:
        summary = run_plan(plan, out, part=part, **options)
    except WavgError as exc:
        return {"error": str(exc), "exit_code": exc.exit_code}
    return {
        "bytes_read": summary.bytes_read,
        "bytes_fetched": summary.bytes_fetched,
        "requests": summary.requests,
        "warnings": summary.warnings,
    }


def _gather(
    client: Any, futures: list, count: int, progress: Callable[[int, int], None] | None
) -> list[dict[str, Any]]:
    """Every part's result, as each completes; the first failure cancels the rest."""
    from distributed import as_completed

    results = []
    try:
        for future in as_completed(futures):
            index = futures.index(future) + 1
            if future.status != "finished":
                exc = future.exception()
                raise WavgError(f"part {index}/{count} failed on the cluster ({_line(exc)})")
            result = future.result()
            if "error" in result:
                failure = WavgError(result["error"])
                failure.exit_code = result["exit_code"]
                raise failure
            results.append(result)
            if progress is not None:
                progress(len(results), count)
    except BaseException:
        client.cancel(futures)
        raise
    return results


def _line(exc: BaseException | None) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _slots(client: Any) -> int:
    client.wait_for_workers(1, timeout=CONNECT_SECONDS)
    workers = client.scheduler_info()["workers"].values()
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers))


@contextlib.contextmanager
def _client(address: str) -> Iterator[Any]:
    """A client of the cluster at `address`; a ``local:K`` cluster lives as long as it."""
    with missing_reported("dask", "--dask"):
        from distributed import Client, LocalCluster
    if address.startswith(LOCAL):
        try:
            workers = int(address[len(LOCAL) :])
        except ValueError:
            workers = 0
        if workers < 1:
            raise UsageError(f"--dask {address!r}: local:K needs a number of workers K >= 1")
        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    if "://" not in address:
        raise UsageError(f"--dask {address!r} is neither tcp://HOST:PORT nor local:K")
    try:
        client = Client(address, timeout=CONNECT_SECONDS)
    except OSError as exc:
        raise UsageError(f"--dask {address}: cannot reach the scheduler ({_line(exc)})") from None
    with client:
        yield client
