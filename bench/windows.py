"""The several-windows workload: ``--last 3,5,10`` in one pass against three separate runs.

On the reference model (mlp-270MB, legacy .h5; 10 checkpoints, the reference cell's 8 plus
two) wavg writes three averages in one pass; the figures are wall time, peak RSS and the
bytes read that ``--json`` reports, for the pass and for ``--last 3``, ``--last 5`` and
``--last 10`` run one by one. Targets: the pass within 1.2x the ``--last 10`` run's time,
and reading what that one run reads. Each output must equal its separate run's bit for bit,
else the note says WRONG OUTPUT.

Runs at the end of ``make bench`` (``--only windows`` alone), or on its own:
``.venv/bin/python bench/windows.py [--quick] [--keep] [--out DIR] [--results DIR]``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import checkpoints
import executable
import measure
from workloads import D_MEDIUM, D_SMALL

BENCH_DIR = Path(__file__).resolve().parent
WINDOWS = (3, 5, 10)
TARGET_RATIO = 1.2


def wanted(selectors: list[str]) -> bool:
    """Part of a full run, or asked for with ``--only windows``."""
    return not selectors or "windows" in selectors


def run(
    wavg: Path, out_dir: Path, results_dir: Path, quick: bool, budget_s: float, keep: bool = False
) -> str:
    """Measure the workload, write ``windows.md`` in `results_dir`, return the closing note.

    The generated checkpoints are deleted afterwards unless `keep`."""
    dataset = D_SMALL if quick else D_MEDIUM
    count = max(WINDOWS)
    checkpoints.ensure(out_dir, [(dataset, "h5", count)])
    inputs = checkpoints.checkpoint_paths(out_dir, dataset, "h5", count)
    measure.warm_cache(inputs)
    file_mb = inputs[-1].stat().st_size / 1e6
    outputs = out_dir / "outputs" / "windows"
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir(parents=True)

    def fresh() -> None:
        for path in outputs.iterdir():
            path.unlink()
        measure.settle()

    def combine(last: str, out: str) -> tuple[measure.Run, int]:
        """The best of repeated runs, and the bytes read one run reports in --json."""
        cmd = [str(wavg), "combine", *map(str, inputs), "--last", last, "-o", str(outputs / out)]
        timed = measure.run_best(cmd, 1800.0, before=fresh, budget_s=budget_s)
        if not timed.ok:
            sys.exit(f"bench: windows workload: wavg failed:\n{timed.stderr_tail}")
        fresh()
        report = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True)
        return timed, json.loads(report.stdout)["bytes_read"]

    one_pass, pass_read = combine(",".join(map(str, WINDOWS)), "avg_n{n}.h5")
    kept = outputs.parent / "windows-pass"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(outputs, kept)
    separate: dict[int, tuple[measure.Run, int]] = {}
    same = True
    for n in WINDOWS:  # each output is compared before the next run clears it
        separate[n] = combine(str(n), f"avg_n{n}.h5")
        same &= filecmp.cmp(kept / f"avg_n{n}.h5", outputs / f"avg_n{n}.h5", shallow=False)
    # The pass also writes len(WINDOWS) - 1 more outputs than --last 10: their fsynced floor.
    output_bytes = (outputs / f"avg_n{count}.h5").stat().st_size
    floor_path = outputs / "floor.bin"
    write = measure.dd_write_cmd(floor_path, output_bytes, fsync=True)
    write_floor = measure.run_best(write, 600.0, before=fresh, budget_s=budget_s).wall_s
    extra_writes = (len(WINDOWS) - 1) * write_floor
    fresh()
    shutil.rmtree(kept, ignore_errors=True)
    if not keep:
        checkpoints.remove(out_dir, dataset)
    largest, largest_read = separate[count]
    ratio = one_pass.wall_s / largest.wall_s
    status = "ok (each output equals its separate run bit for bit)" if same else "WRONG OUTPUT"
    rows = [
        (f"--last {','.join(map(str, WINDOWS))} (one pass)", one_pass, pass_read),
        *((f"--last {n}", timed, read) for n, (timed, read) in separate.items()),
    ]
    total_s = sum(timed.wall_s for timed, _ in separate.values())
    total_read = sum(read for _, read in separate.values())
    lines = [
        "# Several windows in one pass",
        "",
        f"{count} x {file_mb:.0f} MB legacy .h5 ({dataset.name}), warm page cache, fastest of "
        "repeated runs.",
        "",
        "| run | wall s | peak RSS MB | bytes read MB |",
        "|---|---|---|---|",
        *(
            f"| {name} | {t.wall_s:.3f} | {t.peak_rss / 1e6:.0f} | {r / 1e6:.0f} |"
            for name, t, r in rows
        ),
        f"| three separate runs | {total_s:.3f} | | {total_read / 1e6:.0f} |",
        "",
        f"| dd write floor, {len(WINDOWS) - 1} more outputs (fsync) | {extra_writes:.3f} | | |",
        "",
        f"One pass / `--last {count}`: {ratio:.2f}x the time (target <= {TARGET_RATIO}), "
        f"{pass_read / largest_read:.2f}x the bytes read (target 1.00). The pass writes "
        f"{len(WINDOWS)} outputs where `--last {count}` writes one; less the write floor of "
        f"the extra ones, it takes {(one_pass.wall_s - extra_writes) / largest.wall_s:.2f}x. "
        f"Output check: {status}.",
        "",
    ]
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "windows.md").write_text("\n".join(lines))
    return (
        f"windows workload ({count} x {file_mb:.0f} MB): --last 3,5,10 in one pass "
        f"{one_pass.wall_s:.2f} s, {ratio:.2f}x --last {count} alone ({largest.wall_s:.2f} s), "
        f"vs {total_s:.2f} s for three runs; read {pass_read / 1e6:.0f} MB "
        f"(--last {count}: {largest_read / 1e6:.0f} MB, three runs: {total_read / 1e6:.0f} MB); "
        f"peak RSS {one_pass.peak_rss / 1e6:.0f} MB vs {largest.peak_rss / 1e6:.0f} MB; "
        f"fsynced write floor of the {len(WINDOWS) - 1} extra outputs {extra_writes:.2f} s; {status}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 10 MB model instead")
    parser.add_argument("--keep", action="store_true", help="keep generated checkpoints")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="scratch directory")
    parser.add_argument("--results", type=Path, help="where windows.md goes (default OUT/results)")
    parser.add_argument("--wavg", type=Path, help="wavg executable (default: this venv's)")
    args = parser.parse_args(argv)
    results = args.results or args.out / "results"
    budget = 2.0 if args.quick else 12.0
    print(run(executable.find_wavg(args.wavg), args.out, results, args.quick, budget, args.keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
