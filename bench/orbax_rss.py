"""Peak memory of `wavg combine` on an Orbax root: one 4096x4096 float32 kernel, 4 steps.

Keras (JAX backend, in a subprocess) trains Dense(4096, no bias) with Adam for 4 epochs
under ``OrbaxCheckpoint(max_to_keep=None)``; wavg then averages the 4 steps, measured like
every other bench command (`measure.run_once`: wall time, the child's own peak RSS). A
single-device step holds each array as one chunk, so the bound to compare with is a few
64 MiB chunks, not the 768 MiB the steps hold. Each configuration runs `REPEATS` times. Run alone or from ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import measure

BENCH_DIR = Path(__file__).resolve().parent
MIB = 1 << 20
REPEATS = 3  # peaks vary by about a chunk from run to run: report the range

_TRAIN = """
import sys, numpy as np, keras
units, root = int(sys.argv[1]), sys.argv[2]
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((units,)), keras.layers.Dense(units, use_bias=False)])
model.compile(optimizer="adam", loss="mse")
x = np.random.default_rng(0).random((8, units), dtype=np.float32)
callback = keras.callbacks.OrbaxCheckpoint(root, max_to_keep=None)
model.fit(x, x, epochs=4, batch_size=8, callbacks=[callback], verbose=0)
"""


def make_root(root: Path, units: int) -> None:
    """Four steps of one run, written by Keras itself (needs jax and orbax-checkpoint)."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    done = subprocess.run(
        [sys.executable, "-c", _TRAIN, str(units), str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        sys.exit(f"orbax bench: training failed:\n{done.stderr[-2000:]}")


def measure_root(wavg: Path, out: Path, units: int) -> str:
    """Train, average, and return a Markdown report."""
    root, output = out / "root", out / "avg"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    make_root(root, units)
    stored = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    rows = []
    for extra in ([], ["--drop-optimizer"]):
        runs = []
        for _ in range(REPEATS):
            shutil.rmtree(output, ignore_errors=True)
            cmd = [str(wavg), "combine", str(root), *extra, "-o", str(output)]
            run = measure.run_once(cmd, 1800.0)
            if not run.ok:
                sys.exit(f"orbax bench: wavg combine failed:\n{run.stderr_tail}")
            runs.append(run)
        rows.append((" ".join(extra) or "(default)", runs))
    chunk = units * units * 4
    shutil.rmtree(out, ignore_errors=True)
    exact = "" if measure.rss_is_exact() else " (upper bound: no /usr/bin/time)"

    def peaks(runs: list) -> str:
        low, high = min(r.peak_rss for r in runs) / MIB, max(r.peak_rss for r in runs) / MIB
        return f"{low:.0f} MiB" if round(low) == round(high) else f"{low:.0f}-{high:.0f} MiB"

    return "\n".join(
        [
            "## Orbax root: peak RSS of `wavg combine`",
            "",
            f"Dense({units}) kernel, float32, Adam, 4 steps written by OrbaxCheckpoint "
            f"({stored / MIB:.0f} MiB on disk), JAX CPU; one chunk is {chunk / MIB:.0f} MiB. "
            f"{REPEATS} runs each.",
            "",
            "| options | wall (median) | peak RSS | chunks (highest) |",
            "| --- | --- | --- | --- |",
            *(
                f"| {name} | {sorted(r.wall_s for r in runs)[len(runs) // 2]:.2f} s | "
                f"{peaks(runs)}{exact} | {max(r.peak_rss for r in runs) / chunk:.1f} |"
                for name, runs in rows
            ),
            "",
            "Averaging holds the chunk's float64 sum (two chunks' worth) and one input's chunk "
            "as TensorStore reads it (its compressed bytes and the decoded chunk, dropped "
            "before the next input's read): four chunks. Copying the newest step's optimizer "
            "arrays holds one of them read, staged and encoded, before averaging starts. About "
            "80 MiB is the interpreter with numpy and TensorStore. With the optimizer state "
            "copied, some runs peak about one chunk higher than others, inside TensorStore's "
            "reads (not pinned down further).",
            "",
            "Before: at commit 94d77f9, when the averaging still held the newest input's whole "
            "chunk for the one-run check and the previous input's chunk during the next read, "
            "the same machine measured 501-560 MiB (default) and 488-498 MiB "
            "(--drop-optimizer).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=4096, help="kernel is units x units")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "orbax")
    parser.add_argument("--report", type=Path, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    wavg = Path(sys.executable).parent / "wavg"
    report = measure_root(wavg, args.out, args.units)
    print(report)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
