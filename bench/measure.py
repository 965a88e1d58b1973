"""Time a child process and read its own peak RSS; warm the page cache; the dd floors.

Peak RSS is the child's ``ru_maxrss`` as reported by GNU ``/usr/bin/time -f %M``, which
forks the command itself. It cannot be read with ``os.wait4`` on a child the harness spawned
directly: Linux carries the memory of the forking process into the child's ``ru_maxrss``
at exec, so every child would show at least the harness's own RSS (h5py, numpy, the output
check: 100-250 MB). ``time`` is a 2 MB process, so its children start clean. Without it,
wait4 is used and the figures are marked as upper bounds.

Wall time is taken around spawn and reap, so Python start-up and imports count, as they do
for a user.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

READ_CHUNK = 16 * 1024 * 1024
DD_BLOCK = "16M"
GNU_TIME = Path("/usr/bin/time")


@dataclass(frozen=True)
class Run:
    """One measured child: wall seconds, its peak RSS in bytes, and how it ended; `cpu_s` is
    its user + system CPU time (all threads), which a busy machine inflates far less than
    the wall time."""

    wall_s: float
    peak_rss: int
    returncode: int
    timed_out: bool = False
    stderr_tail: str = ""
    cpu_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _limit_nofile(limit: int) -> Callable[[], None]:
    """A preexec hook lowering the soft open-files limit of the child only."""

    def hook() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    return hook


def run_once(
    cmd: Sequence[str], timeout: float, nofile_limit: int | None = None, cwd: Path | None = None
) -> Run:
    """Spawn `cmd` (under GNU time when present); kill its process group after `timeout` s."""
    preexec = _limit_nofile(nofile_limit) if nofile_limit else None
    with tempfile.NamedTemporaryFile("r", prefix="bench-rss-", suffix=".txt") as rss_file:
        wrapped = list(cmd)
        if GNU_TIME.exists():
            wrapped = [str(GNU_TIME), "-f", "%M", "-o", rss_file.name, *wrapped]
        start = time.perf_counter()
        proc = subprocess.Popen(
            wrapped,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=preexec,  # noqa: PLW1509 (only setrlimit, no threads in the hook)
            start_new_session=True,  # one process group: a timeout kills time and the command
            cwd=cwd,
        )
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        # Drain stderr in a thread: a chatty child must not block on a full pipe meanwhile.
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
        reader.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C or SIGTERM: the child's own session would outlive us
            os.killpg(proc.pid, signal.SIGKILL)
            timer.cancel()
            raise
        wall = time.perf_counter() - start
        timer.cancel()
        reader.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        peak = _peak_rss(rss_file.read(), usage.ru_maxrss)
    tail = b"".join(chunks).decode(errors="replace").strip()[-600:]
    cpu = usage.ru_utime + usage.ru_stime  # the child and what it waited for (GNU time)
    return Run(wall, peak, proc.returncode, killed.is_set(), tail, cpu)


def _peak_rss(time_output: str, fallback_kb: int) -> int:
    """Bytes from GNU time's %M (KiB; last line, after any 'Command exited' notice)."""
    lines = time_output.strip().splitlines()
    if lines and lines[-1].strip().isdigit():
        return int(lines[-1]) * 1024
    return fallback_kb * 1024


def rss_is_exact() -> bool:
    """False when peak RSS falls back to wait4 and so includes the harness's own memory."""
    return GNU_TIME.exists()


def run_best(
    cmd: Sequence[str],
    timeout: float,
    before: Callable[[], None] | None = None,
    nofile_limit: int | None = None,
    budget_s: float = 4.0,
    max_runs: int = 5,
) -> Run:
    """Run `cmd` until `budget_s` seconds or `max_runs` runs are spent (at least once);
    the fastest run's wall time, the highest peak RSS.

    Repeating matters here: two cores shared with other work and a VM disk whose write
    speed swings 3x from one second to the next make a single run of a short command
    noisy; the minimum is the least disturbed one. `before` runs untimed before each try
    (removing the previous output and syncing, say).
    """
    runs: list[Run] = []
    while len(runs) < max_runs:
        if before is not None:
            before()
        runs.append(run_once(cmd, timeout, nofile_limit))
        if not runs[-1].ok or sum(r.wall_s for r in runs) + runs[-1].wall_s > budget_s:
            break
    if not runs[-1].ok:
        return runs[-1]
    best = min(runs, key=lambda r: r.wall_s)
    return Run(best.wall_s, max(r.peak_rss for r in runs), 0)


def warm_cache(paths: Sequence[Path]) -> int:
    """Read every file once so timings see a warm page cache; returns bytes read."""
    total = 0
    buffer = bytearray(READ_CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                total += n
    return total


def dd_read_cmd(paths: Sequence[Path]) -> list[str]:
    """One child that dd's every input to /dev/null: the read floor, timed as one run.

    It includes one dd start per file (about a millisecond each), which only matters for
    the many-tiny-files cell.
    """
    script = f'for f in "$@"; do dd if="$f" of=/dev/null bs={DD_BLOCK} status=none || exit 1; done'
    return ["sh", "-c", script, "dd-read", *map(str, paths)]


def dd_write_cmd(target: Path, nbytes: int, fsync: bool = False) -> list[str]:
    """dd writing `nbytes` of zeros to `target`: the write floor, with or without fsync.

    Without fsync the data only reaches the page cache; wavg fsyncs its output before the
    atomic rename, so both floors are measured and wavg is comparable to the fsync one.
    """
    blocks = max(1, -(-nbytes // (1024 * 1024)))
    cmd = ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={blocks}", "status=none"]
    return cmd + (["conv=fsync"] if fsync else [])


def mem_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (what a new process could use without swap)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def settle() -> None:
    """Flush dirty pages so that writeback of earlier steps is not billed to the next one.

    On this VM, deleting or writing a GB leaves writeback (and ext4 discards) running for a
    second or two; without a sync the next timed command pays for it.
    """
    os.sync()


def fresh_output(path: Path) -> Callable[[], None]:
    """A `before` hook: delete the previous output, then settle, so every try starts equal."""

    def hook() -> None:
        path.unlink(missing_ok=True)
        settle()

    return hook


def available_disk(path: Path) -> int:
    """Free bytes on the file system holding `path`."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize
