"""Measure one cell: warm the cache, then dd floors, wavg (checked), and the baselines.

Every tool of a cell reads the same files in the same cache state, right after one another,
so the ratios between them are as fair as two shared cores allow. Baselines that would not
fit in memory are skipped, not attempted, and say so in the table.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import measure
from results import OK, Row, with_ratios
from verify import verify_average
from workloads import SUFFIXES, Cell

BENCH_DIR = Path(__file__).resolve().parent
GiB = 1 << 30
MB = 1e6
RAM_CAP = 16 * GiB  # the brief's ceiling for a baseline, below the machine's 24 GiB
TIMEOUT_S = 1800.0
# The tutorial calls get_weights() once per tensor per model: quadratic in the tensor count,
# minutes on the 600-tensor model. Past this it is reported as a timeout (a lower bound).
TUTORIAL_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Context:
    """What every cell needs: where wavg is, where outputs go, and the startup row to copy."""

    wavg: Path
    out_dir: Path
    budget_s: float = 12.0  # repeat wavg and the dd floors until this many seconds (5 runs max)


def wavg_cmd(ctx: Context, inputs: list[Path], output: Path) -> list[str]:
    return [str(ctx.wavg), "combine", "--scheme", "equal", *map(str, inputs), "-o", str(output)]


def tutorial_cmd(inputs: list[Path], output: Path) -> list[str]:
    script = BENCH_DIR / "tutorial_way.py"
    return [sys.executable, str(script), *map(str, inputs), "-o", str(output)]


def inmemory_cmd(inputs: list[Path], output: Path) -> list[str]:
    script = BENCH_DIR / "inmemory_h5py.py"
    return [sys.executable, str(script), *map(str, inputs), "-o", str(output)]


def estimated_peak(tool: str, cell: Cell, total: int) -> int:
    """Rough peak RSS of a baseline, to skip it before it can take the machine down.

    Tutorial: 2.4x the input bytes + TF (fits 5.1 GB measured for 8 x 270 MB). In-memory:
    all inputs, plus the stacked float32 copy and numpy.average's float64 product of the
    largest tensor across the N files.
    """
    if tool == "tutorial":
        return int(2.4 * total + 0.7 * GiB)
    model = cell.dataset.model
    largest, fan_in = 0, model.input_dim
    for width in model.units:
        largest, fan_in = max(largest, 4 * fan_in * width), width
    return int(total + 3 * cell.n * largest + 0.2 * GiB)


def ram_budget() -> int:
    """Memory a baseline may use now: the cap, or what is free less a margin for the others."""
    return min(RAM_CAP, measure.mem_available() - 3 * GiB)


def measure_cell(ctx: Context, cell: Cell, inputs: list[Path]) -> list[Row]:
    """All rows of one cell, ratios filled in."""
    sizes = [p.stat().st_size for p in inputs]
    total = sum(sizes)
    base = dict(
        cell=cell.name,
        groups=" ".join(cell.groups),
        fmt=cell.fmt,
        n=len(inputs),
        file_mb=total / len(inputs) / MB,
        total_mb=total / MB,
    )
    cached = total < measure.mem_available() * 0.8
    cache_note = "" if cached else "inputs exceed free RAM: read from disk, not warm cache"
    if cached:
        measure.warm_cache(inputs)
    measure.settle()
    outputs = ctx.out_dir / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    dd_read = measure.run_best(
        measure.dd_read_cmd(inputs), TIMEOUT_S, measure.settle, budget_s=ctx.budget_s
    )
    rows = [_row(base, "dd-read", dd_read)]
    wavg_out = outputs / f"wavg{SUFFIXES[cell.fmt]}"
    rows.append(_measure_wavg(ctx, cell, base, inputs, wavg_out))
    for tool in ("tutorial", "inmemory"):
        if tool in cell.tools:
            rows.append(_measure_baseline(tool, cell, base, inputs, outputs, total))
    rows += [_dd_write(ctx, base, outputs, max(sizes), fsync) for fsync in (False, True)]
    shutil.rmtree(outputs, ignore_errors=True)
    return with_ratios([_noted(row, cache_note) for row in rows])


def _dd_write(ctx: Context, base: dict, outputs: Path, nbytes: int, fsync: bool) -> Row:
    """One output-sized file written by dd, to the page cache or through to the disk."""
    target = outputs / "dd-write.bin"
    cmd = measure.dd_write_cmd(target, nbytes, fsync)
    run = measure.run_best(cmd, TIMEOUT_S, measure.fresh_output(target), budget_s=ctx.budget_s)
    tool = "dd-write-fsync" if fsync else "dd-write"
    return _noted(_row(base, tool, run), "conv=fsync" if fsync else "no fsync (page cache)")


def _row(base: dict, tool: str, run: measure.Run) -> Row:
    if run.timed_out:
        return Row(**base, tool=tool, status=f"timeout (> {run.wall_s:.0f} s)")
    if not run.ok:
        return Row(
            **base, tool=tool, status=f"failed (exit {run.returncode})", note=run.stderr_tail
        )
    return Row(**base, tool=tool, status=OK, wall_s=run.wall_s, peak_rss_mb=run.peak_rss / MB)


def _noted(row: Row, note: str) -> Row:
    return replace(row, note="; ".join(x for x in (row.note, note) if x))


def _measure_wavg(ctx: Context, cell: Cell, base: dict, inputs: list[Path], out: Path) -> Row:
    run = measure.run_best(
        wavg_cmd(ctx, inputs, out),
        TIMEOUT_S,
        measure.fresh_output(out),
        nofile_limit=cell.nofile_limit,
        budget_s=ctx.budget_s,
    )
    row = _row(base, "wavg", run)
    if cell.nofile_limit:
        row = _noted(row, f"run with ulimit -n {cell.nofile_limit}")
    if row.status != OK:
        return row
    check = verify_average(inputs, [1.0 / len(inputs)] * len(inputs), out)
    row = replace(row, check=check.summary())
    return row if check.ok else replace(row, status="WRONG OUTPUT", note=check.message)


def _measure_baseline(
    tool: str, cell: Cell, base: dict, inputs: list[Path], outputs: Path, total: int
) -> Row:
    estimate, budget = estimated_peak(tool, cell, total), ram_budget()
    if estimate > budget:
        note = f"would need ~{estimate / GiB:.1f} GiB, budget {budget / GiB:.1f} GiB"
        return Row(**base, tool=tool, status="skipped (RAM)", note=note)
    out = outputs / f"{tool}{SUFFIXES[cell.fmt]}"
    make = tutorial_cmd if tool == "tutorial" else inmemory_cmd
    timeout = TUTORIAL_TIMEOUT_S if tool == "tutorial" else TIMEOUT_S
    return _row(base, tool, measure.run_best(make(inputs, out), timeout, measure.fresh_output(out)))


def measure_startup(ctx: Context) -> Row:
    """`wavg --version`: interpreter start plus wavg's imports, the fixed cost of every run."""
    run = measure.run_best([str(ctx.wavg), "--version"], 60.0)
    base = dict(cell="startup", groups="startup", fmt="-", n=0, file_mb=0.0, total_mb=0.0)
    return _row(base, "startup", run)
