"""Reproduce the case study with several seeds and report what averaging gives.

For each seed: `wavg train-save` (a training setting: optimizer, constant learning rate, batch
size, epochs; keep the last K), then `wavg evaluate` on the test split with every column it
offers (averages, +bn with --bn-data, the greedy soup chosen on the validation split, the
ensemble). Reports per-seed rows, then mean ± sd over seeds of each column at n = K, and the
paired gain of each column over the last epoch (mean ± standard error over seeds).

    .venv/bin/python scripts/reproduce_case_study.py --seeds 1 2 3 4 5                # tutorial
    .venv/bin/python scripts/reproduce_case_study.py --optimizer sgd --lr 0.05 --epochs 300
    .venv/bin/python scripts/reproduce_case_study.py --data digits --optimizer sgd --lr 0.05 \\
        --epochs 20 --keep 5 --bn-data digits
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time

from wavg.workflows.evaluate import evaluate
from wavg.workflows.train import train_save


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Accuracies for one seed: all single checkpoints, the last epoch, each column at n=K."""
    with tempfile.TemporaryDirectory(prefix=f"wavg-case-study-{seed}-") as tmp:
        files = train_save(
            tmp,
            epochs=args.epochs,
            keep=args.keep,
            seed=seed,
            optimizer=args.optimizer,
            learning_rate=args.lr,
            batch_size=args.batch_size,
            data=args.data,
        ).files
        result = evaluate(files, data=args.data, bn_data=args.bn_data)
    accuracy = [row["single"]["accuracy"] for row in result.scores]
    found = {"single": accuracy, "last epoch": [accuracy[0]]}
    for column in result.columns[1:]:
        found[column] = [result.scores[-1][column]["accuracy"]]
    return found


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def _gain(runs: list[dict[str, list[float]]], column: str) -> str:
    diffs = [run[column][0] - run["last epoch"][0] for run in runs]
    if len(diffs) < 2:
        return f"{diffs[0]:+.4f}"
    mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    ratio = f" ({mean / se:+.1f} se)" if se > 0 else ""
    return f"{mean:+.4f} ± {se:.4f}{ratio}"


def report(runs: dict[int, dict[str, list[float]]], keep: int) -> str:
    """A Markdown report: per-seed rows, then mean ± sd and the paired gain per column."""
    columns = [c for c in next(iter(runs.values())) if c not in ("single", "last epoch")]
    header = ["seed", f"single (min – max of {keep})", "last epoch"]
    header += [f"{c} (n={keep})" for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for seed, run in runs.items():
        cells = [
            f"{min(run['single']):.3f} – {max(run['single']):.3f}",
            f"{run['last epoch'][0]:.3f}",
        ]
        cells += [f"{run[c][0]:.3f}" for c in columns]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| n = {keep} | mean ± sd over {len(runs)} seeds | gain over the last epoch (mean ± se) |",
        "|---|---|---|",
    ]
    pooled = {c: [v for run in runs.values() for v in run[c]] for c in ("single", "last epoch")}
    lines.append(f"| single checkpoints (all {keep} per seed) | {_mean_sd(pooled['single'])} | |")
    lines.append(f"| last epoch | {_mean_sd(pooled['last epoch'])} | |")
    for column in columns:
        values = [run[column][0] for run in runs.values()]
        lines.append(f"| {column} | {_mean_sd(values)} | {_gain(list(runs.values()), column)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--keep", type=int, default=10)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--lr", type=float, default=None, help="constant learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", default="blobs", help="blobs, digits or FILE.npz")
    parser.add_argument("--bn-data", default=None, help="add the +bn columns")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    runs = {}
    for seed in args.seeds:
        print(f"seed {seed} ...", file=sys.stderr, flush=True)
        runs[seed] = run_seed(seed, args)
    lr = args.lr if args.lr is not None else ("0.01" if args.optimizer == "sgd" else "0.001")
    print(
        f"{args.data}: {args.optimizer}, learning rate {lr}, batch size {args.batch_size}, "
        f"{args.epochs} epochs, last {args.keep} kept; test accuracy; "
        f"{time.perf_counter() - start:.0f} s in total.\n"
    )
    print(report(runs, args.keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
