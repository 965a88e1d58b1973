"""Look for a training setting on the blobs data where averaging the last epochs pays off.

For each setting (optimizer, constant learning rate, batch size, epochs) and each seed it
trains the built-in MLP, keeps the last K epochs, and scores on the 1000 test samples the last
epoch, the equal and exp averages of the K newest and the ensemble. A setting "shows a gain"
when the mean paired difference (average minus last epoch) over the seeds exceeds two
standard errors. Prints one Markdown row per setting, then (with --json) every score.

    .venv/bin/python scripts/search_gain_setting.py sgd:0.1:8:100 adam:0.01:8:100
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time

from wavg.workflows.evaluate import evaluate
from wavg.workflows.train import train_save


def parse_setting(text: str) -> dict:
    """``optimizer:lr:batch:epochs``, e.g. ``sgd:0.1:8:100``."""
    optimizer, lr, batch, epochs = text.split(":")
    return {"optimizer": optimizer, "lr": float(lr), "batch": int(batch), "epochs": int(epochs)}


def run(setting: dict, seed: int, keep: int) -> dict[str, float]:
    """Test accuracy of the last epoch, each average of the `keep` newest and the ensemble."""
    with tempfile.TemporaryDirectory(prefix=f"wavg-search-{seed}-") as tmp:
        files = train_save(
            tmp,
            epochs=setting["epochs"],
            keep=keep,
            seed=seed,
            optimizer=setting["optimizer"],
            learning_rate=setting["lr"],
            batch_size=setting["batch"],
        ).files
        result = evaluate(files, data="blobs", schemes=["equal", "exp"], greedy=False)
    rows = result.scores
    return {
        "last": rows[0]["single"]["accuracy"],
        "singles_mean": statistics.mean(r["single"]["accuracy"] for r in rows),
        "equal": rows[-1]["equal"]["accuracy"],
        "exp": rows[-1]["exp"]["accuracy"],
        "ensemble": rows[-1]["ensemble"]["accuracy"],
    }


def gain(runs: list[dict[str, float]], column: str) -> tuple[float, float]:
    """Mean and standard error over seeds of (column - last epoch)."""
    diffs = [r[column] - r["last"] for r in runs]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="optimizer:lr:batch:epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--keep", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="also print every score as JSON")
    args = parser.parse_args(argv)
    print("| setting | last epoch | equal | exp | ensemble | equal − last (± se) | s/seed |")
    print("|---|---|---|---|---|---|---|")
    everything = {}
    for text in args.settings:
        setting = parse_setting(text)
        start = time.perf_counter()
        runs = [run(setting, seed, args.keep) for seed in args.seeds]
        per_seed = (time.perf_counter() - start) / len(args.seeds)
        everything[text] = runs
        means = {
            c: statistics.mean(r[c] for r in runs) for c in ("last", "equal", "exp", "ensemble")
        }
        diff, se = gain(runs, "equal")
        print(
            f"| {text} | {means['last']:.4f} | {means['equal']:.4f} | {means['exp']:.4f} | "
            f"{means['ensemble']:.4f} | {diff:+.4f} ± {se:.4f} | {per_seed:.0f} |",
            flush=True,
        )
    if args.json:
        print(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
