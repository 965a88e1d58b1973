"""Compare two wavg builds on the benchmark's cells, interleaved, on a shared machine.

``make bench`` measures one build; a before/after figure from two such runs minutes apart
mostly measures how busy the machine was. Here every round runs, back to back on the same
warm files: the dd read floor, build A, build B and the dd write+fsync floor, and each
figure is the fastest of its rounds, so both builds meet the same noise. CPU seconds (user +
system, all threads) are printed too: a busy machine inflates them far less than wall time.

    .venv/bin/python bench/compare.py --a OLD/wavg --b .venv/bin/wavg --only apps --rounds 7

Checkpoints come from ``--out`` (as ``bench/run.py --keep --out`` leaves them; missing ones
are generated). Prints a Markdown table; nothing is written elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import checkpoints
import executable
import measure
from workloads import SUFFIXES, full_cells

BENCH_DIR = Path(__file__).resolve().parent
TIMEOUT_S = 600.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="wavg executable A (before)")
    parser.add_argument("--b", type=Path, required=True, help="wavg executable B (after)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    return parser.parse_args(argv)


def fastest(runs: list[measure.Run]) -> tuple[float, float, float]:
    """(best wall s, least CPU s, highest peak RSS MB); raises if any run failed."""
    for run in runs:
        if not run.ok:
            raise RuntimeError(f"a run failed: {run.stderr_tail}")
    return (
        min(r.wall_s for r in runs),
        min(r.cpu_s for r in runs),
        max(r.peak_rss for r in runs) / 1e6,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selectors = [s for item in args.only for s in item.split(",") if s]
    cells = [c for c in full_cells() if c.matches(selectors) and c.name != "sample"]
    outputs = args.out / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    for wavg in (args.a, args.b):
        executable.compile_bytecode(Path(wavg))
    print(
        "| cell | read s | read+write s | A s | B s | A / read | B / read | A / r+w | B / r+w "
        "| A CPU s | B CPU s | A RSS MB | B RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        checkpoints.ensure(args.out, [(cell.dataset, cell.fmt, cell.n)])
        inputs = checkpoints.checkpoint_paths(args.out, cell.dataset, cell.fmt, cell.n)
        measure.warm_cache(inputs)
        out = outputs / f"compare{SUFFIXES[cell.fmt]}"
        target = outputs / "dd-write.bin"
        size = max(p.stat().st_size for p in inputs)
        runs: dict[str, list[measure.Run]] = {"read": [], "a": [], "b": [], "write": []}
        for _ in range(args.rounds):
            measure.settle()
            runs["read"].append(measure.run_once(measure.dd_read_cmd(inputs), TIMEOUT_S))
            for key, wavg in (("a", args.a), ("b", args.b)):
                measure.fresh_output(out)()
                cmd = [str(wavg), "combine", *map(str, inputs), "-o", str(out)]
                runs[key].append(measure.run_once(cmd, TIMEOUT_S, cell.nofile_limit))
            measure.fresh_output(target)()
            cmd = measure.dd_write_cmd(target, size, fsync=True)
            runs["write"].append(measure.run_once(cmd, TIMEOUT_S))
        read, write = fastest(runs["read"])[0], fastest(runs["write"])[0]
        (a, a_cpu, a_rss), (b, b_cpu, b_rss) = fastest(runs["a"]), fastest(runs["b"])
        floor = read + write
        print(
            f"| {cell.name} | {read:.3f} | {floor:.3f} | {a:.3f} | {b:.3f} | {a / read:.2f} "
            f"| {b / read:.2f} | {a / floor:.2f} | {b / floor:.2f} | {a_cpu:.3f} | {b_cpu:.3f} "
            f"| {a_rss:.0f} | {b_rss:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
