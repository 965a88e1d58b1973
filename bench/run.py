"""Benchmark wavg combine against the tutorial way, an in-memory h5py script and dd floors.

``make bench`` runs the full matrix (about 45 GB of generated checkpoints, biggest last);
``make bench-quick`` (``--quick``) runs small sizes only, in under a minute. The harness
never imports TensorFlow: checkpoints are written by ``keras_gen.py`` in a subprocess.

A full run (no ``--quick``, no ``--only``) writes bench/results/{results.csv,RESULTS.md,
bench.png}; partial runs write to ``OUT/results`` instead, so they never overwrite the
committed full results with a subset. Generated checkpoints are deleted as soon as no
remaining cell needs them, unless ``--keep``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

import checkpoints
import distributed
import executable
import measure
import orbax_rss
import plots
import remote_workload
import report
import runner
import sharded
import targets
import windows
from machine import describe
from results import Row, write_csv
from workloads import Cell, Dataset, full_cells, quick_cells

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SAMPLE_DIR = REPO / "sample_checkpoints"
DISK_MARGIN = 3 << 30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (< 1 minute)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="cell or group (scale, ref, formats, many, sample, fds, sharded, windows, remote, "
        "apps); repeat or comma-separate",
    )
    parser.add_argument("--keep", action="store_true", help="keep generated checkpoints")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="scratch directory")
    parser.add_argument("--results", type=Path, help="where results go (see module doc)")
    parser.add_argument("--list", action="store_true", help="list the cells and exit")
    parser.add_argument(
        "--wavg",
        type=Path,
        help="wavg executable to measure (default: this venv's; compare builds)",
    )
    return parser.parse_args(argv)


def sample_inputs() -> list[Path] | None:
    """The repo's sample_checkpoints/, when it has checkpoints; else None (generate 10)."""
    if not SAMPLE_DIR.is_dir():
        return None
    files = sorted(p for p in SAMPLE_DIR.iterdir() if p.suffix in (".h5", ".keras"))
    return files or None


def needed_n(cell: Cell, remaining: list[Cell]) -> int:
    """How many files to write now: growing datasets only what this cell needs."""
    if cell.dataset.grow:
        return cell.n
    same = [c.n for c in remaining if c.dataset is cell.dataset and c.fmt == cell.fmt]
    return max([cell.n, *same])


def prepare(root: Path, cell: Cell, remaining: list[Cell]) -> tuple[list[Path] | None, str]:
    """The cell's input files, written if needed; (None, reason) when the disk is too full."""
    if cell.name == "sample" and (repo_samples := sample_inputs()):
        return repo_samples, "repo sample_checkpoints/"
    n = needed_n(cell, remaining)
    root.mkdir(parents=True, exist_ok=True)
    need = checkpoints.disk_needed(root, cell.dataset, cell.fmt, n)
    if need + DISK_MARGIN > measure.available_disk(root):
        return None, f"needs {need / 1e9:.0f} GB more disk"
    spent = checkpoints.ensure(root, [(cell.dataset, cell.fmt, n)])
    note = f"generated in {spent:.0f} s" if spent else ""
    return checkpoints.checkpoint_paths(root, cell.dataset, cell.fmt, cell.n), note


def pregenerate(root: Path, cells: list[Cell]) -> float:
    """Write every non-growing dataset up front in one TensorFlow start-up (~5 s saved per
    dataset), when the disk holds them all at once; the 1 GB set still grows cell by cell."""
    requests = {
        (c.dataset, c.fmt): needed_n(c, cells)
        for c in cells
        if not c.dataset.grow and not (c.name == "sample" and sample_inputs())
    }
    batch = [(dataset, fmt, n) for (dataset, fmt), n in requests.items()]
    root.mkdir(parents=True, exist_ok=True)
    need = sum(checkpoints.disk_needed(root, *request) for request in batch)
    if not batch or need + DISK_MARGIN > measure.available_disk(root):
        return 0.0
    return checkpoints.ensure(root, batch)


def skipped_rows(cell: Cell, reason: str) -> list[Row]:
    base = dict(cell=cell.name, groups=" ".join(cell.groups), fmt=cell.fmt, n=cell.n)
    size = dict(file_mb=cell.dataset.model.weight_bytes / 1e6, total_mb=0.0)
    return [Row(**base, **size, tool=t, status="skipped (disk)", note=reason) for t in cell.tools]


def release(root: Path, cell: Cell, remaining: list[Cell], keep: bool) -> None:
    """Delete a dataset as soon as no remaining cell reads it (the 1 GB set is 32 GB)."""
    dataset: Dataset = cell.dataset
    if not keep and all(c.dataset is not dataset for c in remaining):
        checkpoints.remove(root, dataset)


def emit(rows: list[Row], results_dir: Path, notes: list[str], draw: bool) -> None:
    """Write CSV (every cell, so a cut-short run keeps what it measured) and, at the end, all."""
    write_csv(rows, results_dir / "results.csv")
    if not draw:
        return
    verdicts = targets.evaluate(rows)
    print(report.results_table(rows))
    print()
    print(report.targets_table(verdicts))
    text = report.results_markdown(rows, verdicts, describe(REPO), notes)
    report.write_markdown(results_dir / "RESULTS.md", text)
    plots.draw(rows, results_dir / "bench.png")
    print(f"\nwrote {results_dir}/results.csv, RESULTS.md, bench.png", file=sys.stderr)


def _interrupt_on_sigterm() -> None:
    """SIGTERM stops the run like Ctrl-C: the running child is killed, results are written."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _interrupt_on_sigterm()
    selectors = [s for item in args.only for s in item.split(",") if s]
    cells = [c for c in (quick_cells() if args.quick else full_cells()) if c.matches(selectors)]
    run_remote = not args.quick and (not selectors or "remote" in selectors)
    extra = sharded.wanted(selectors) or windows.wanted(selectors)
    if args.list or not (cells or run_remote or extra):
        print("\n".join(f"{c.name:28} groups={','.join(c.groups)}" for c in cells) or "no cell")
        return 0 if cells else 2
    partial = args.quick or bool(selectors)
    results_dir = args.results or (args.out / "results" if partial else BENCH_DIR / "results")
    ctx = runner.Context(
        wavg=executable.find_wavg(args.wavg), out_dir=args.out, budget_s=2.0 if args.quick else 12.0
    )
    notes = ["quick mode: small sizes only"] if args.quick else []
    if not measure.rss_is_exact():
        notes.append("no /usr/bin/time: peak RSS figures include the harness's (upper bounds)")
    rows: list[Row] = [runner.measure_startup(ctx)]
    started = time.perf_counter()
    try:
        if spent := pregenerate(args.out, cells):
            notes.append(f"checkpoints of the non-growing datasets generated in {spent:.0f} s")
        for i, cell in enumerate(cells):
            remaining = cells[i + 1 :]
            print(f"[{time.perf_counter() - started:6.0f} s] {cell.name}", file=sys.stderr)
            inputs, note = prepare(args.out, cell, remaining)
            if inputs is None:
                rows += skipped_rows(cell, note)
                notes.append(f"{cell.name}: skipped, {note}")
            else:
                cell_rows = runner.measure_cell(ctx, cell, inputs)
                rows += cell_rows
                if note:
                    notes.append(f"{cell.name}: {note}")
            release(args.out, cell, remaining, args.keep)
            emit(rows, results_dir, notes, draw=False)
        if sharded.wanted(selectors):
            print(f"[{time.perf_counter() - started:6.0f} s] sharded", file=sys.stderr)
            notes.append(
                sharded.run(ctx.wavg, args.out, results_dir, args.quick, ctx.budget_s, args.keep)
            )
        if windows.wanted(selectors):  # --last 3,5,10 in one pass: see windows.py
            print(f"[{time.perf_counter() - started:6.0f} s] windows", file=sys.stderr)
            notes.append(
                windows.run(ctx.wavg, args.out, results_dir, args.quick, ctx.budget_s, args.keep)
            )
        if run_remote:  # object storage: see remote_workload.py and distributed.py
            notes += distributed.run(args.out, ctx.wavg, keep=True)  # the same checkpoints
            notes += remote_workload.run(args.out, ctx.wavg, args.keep)
    except KeyboardInterrupt:
        notes.append("run interrupted: cells after the last row were not measured")
    notes.append(f"total harness time {time.perf_counter() - started:.0f} s")
    emit(rows, results_dir, notes, draw=True)
    if not args.keep:
        shutil.rmtree(args.out / "outputs", ignore_errors=True)
    if not selectors:  # Orbax roots are measured on their own: see bench/orbax_rss.py
        units = "1024" if args.quick else "4096"
        report = str(results_dir / "ORBAX.md")
        orbax_rss.main(["--units", units, "--out", str(args.out / "orbax"), "--report", report])
    return 0


if __name__ == "__main__":
    sys.exit(main())
