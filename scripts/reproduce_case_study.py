"""Reproduce the tutorial's case study with several seeds and report what averaging gives.

For each seed: `wavg train-save` (500 epochs, Adam, keep model_490 ... model_499), then
`wavg evaluate` on the 1000 test samples. Reports the test accuracy of the single checkpoints
and of each average and the ensemble of the 10 newest, as mean +- sd over seeds, next to the
figures the tutorial reported. Takes about 30 s per seed on two CPU cores.

    .venv/bin/python scripts/reproduce_case_study.py --seeds 1 2 3 4 5 --write docs/case_study.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from wavg.evaluate import evaluate
from wavg.train import train_save

TUTORIAL = {
    "single": "0.802 - 0.814",
    "equal": "0.807 - 0.814",
    "linear": "up to 0.815",
    "exp": "0.813 - 0.815",
    "ensemble": "(not reported)",
}
COLUMNS = ("single", "equal", "linear", "exp", "ensemble")


def run_seed(seed: int, epochs: int, keep: int, optimizer: str) -> dict[str, list[float]]:
    """Accuracies for one seed: all single checkpoints, and each column at n = keep."""
    with tempfile.TemporaryDirectory(prefix=f"wavg-case-study-{seed}-") as tmp:
        files = train_save(tmp, epochs=epochs, keep=keep, seed=seed, optimizer=optimizer).files
        result = evaluate(files, data="blobs")
    accuracy = [row["single"]["accuracy"] for row in result.scores]
    found = {"single": accuracy, "newest": [accuracy[0]]}
    for column in COLUMNS[1:]:
        found[column] = [result.scores[-1][column]["accuracy"]]
    return found


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def report(runs: dict[int, dict[str, list[float]]], keep: int, seconds: float) -> str:
    """A Markdown report: per-seed rows, then the summary next to the tutorial."""
    lines = [
        f"| seed | single checkpoints (min – max of {keep}) | last epoch | "
        f"equal (n={keep}) | linear (n={keep}) | exp α=2 (n={keep}) | ensemble (n={keep}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, run in runs.items():
        cells = [f"{min(run['single']):.3f} – {max(run['single']):.3f}", f"{run['newest'][0]:.3f}"]
        cells += [f"{run[c][0]:.3f}" for c in COLUMNS[1:]]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| | wavg, mean ± sd over {len(runs)} seeds | tutorial (one run) |",
        "|---|---|---|",
    ]
    pooled = {c: [v for run in runs.values() for v in run[c]] for c in (*COLUMNS, "newest")}
    lines.append(
        f"| single checkpoints (all {keep} per seed) | {_mean_sd(pooled['single'])} | "
        f"{TUTORIAL['single']} |"
    )
    lines.append(f"| last epoch only | {_mean_sd(pooled['newest'])} | |")
    for column in COLUMNS[1:]:
        label = "exp average (α = 2)" if column == "exp" else f"{column} average"
        if column == "ensemble":
            label = "output ensemble"
        lines.append(f"| {label}, n = {keep} | {_mean_sd(pooled[column])} | {TUTORIAL[column]} |")
    lines.append("")
    lines.append(f"Test accuracy on the 1000 test samples; {seconds:.0f} s in total.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--keep", type=int, default=10)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--write", type=Path, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    runs = {}
    for seed in args.seeds:
        print(f"seed {seed} ...", file=sys.stderr, flush=True)
        runs[seed] = run_seed(seed, args.epochs, args.keep, args.optimizer)
    text = report(runs, args.keep, time.perf_counter() - start)
    text = f"Optimizer: {args.optimizer}, {args.epochs} epochs.\n\n{text}"
    print(text)
    if args.write:
        args.write.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
