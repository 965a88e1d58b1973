"""The sharded workload: the same checkpoints saved sharded and unsharded, averaged by wavg.

Each checkpoint is written twice by Keras (in a subprocess, as everywhere in the harness):
``save_weights("ckpt_i.weights.json", max_shard_size=...)`` and ``save_weights(
"ckpt_i.weights.h5")``. wavg averages each set; the figures are wall time and peak RSS,
the ratio sharded / unsharded, and the sharded time over the dd read floor of its files.
The two outputs must hold the same tensors bit for bit, else the row says WRONG OUTPUT.

Runs at the end of ``make bench`` (``--only sharded`` alone), or on its own:
``.venv/bin/python bench/sharded.py [--quick] [--keep] [--out DIR] [--results DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import executable
import measure

BENCH_DIR = Path(__file__).resolve().parent
# Full: 8 checkpoints of Dense(4096) x 4 (269 MB of float32 each) in shards of <= 100 MB.
FULL = {"n": 8, "input_dim": 4096, "units": [4096] * 4, "shard_gb": 0.1}
QUICK = {"n": 4, "input_dim": 512, "units": [1024] * 3, "shard_gb": 0.005}


@dataclass(frozen=True)
class Figures:
    sharded_s: float
    unsharded_s: float
    read_floor_s: float
    sharded_rss: int
    unsharded_rss: int
    shards_per_file: int
    file_mb: float
    n: int
    status: str

    @property
    def ratio(self) -> float:
        return self.sharded_s / self.unsharded_s

    def note(self) -> str:
        return (
            f"sharded workload ({self.n} x {self.file_mb:.0f} MB, {self.shards_per_file} shards "
            f"each): wavg {self.sharded_s:.2f} s sharded vs {self.unsharded_s:.2f} s unsharded "
            f"(ratio {self.ratio:.2f}), {self.sharded_s / self.read_floor_s:.2f}x the dd read "
            f"floor; peak RSS {self.sharded_rss / 1e6:.0f} MB vs {self.unsharded_rss / 1e6:.0f} "
            f"MB; {self.status}"
        )

    def markdown(self) -> str:
        return "\n".join(
            [
                "# Sharded workload",
                "",
                "| inputs | wall s | peak RSS MB | / unsharded | / dd read floor |",
                "|---|---|---|---|---|",
                f"| {self.n} x `.weights.json` ({self.shards_per_file} shards) | "
                f"{self.sharded_s:.3f} | {self.sharded_rss / 1e6:.0f} | {self.ratio:.2f} | "
                f"{self.sharded_s / self.read_floor_s:.2f} |",
                f"| {self.n} x `.weights.h5` | {self.unsharded_s:.3f} | "
                f"{self.unsharded_rss / 1e6:.0f} | 1.00 | "
                f"{self.unsharded_s / self.read_floor_s:.2f} |",
                f"| dd read floor (sharded files) | {self.read_floor_s:.3f} | | | 1.00 |",
                "",
                f"Output check: {self.status}. {self.file_mb:.0f} MB of float32 weights per "
                "checkpoint, warm page cache, fastest of repeated runs.",
                "",
            ]
        )


def wanted(selectors: list[str]) -> bool:
    """Part of a full run, or asked for with ``--only sharded``."""
    return not selectors or "sharded" in selectors


def generate(directory: Path, spec: dict) -> list[tuple[Path, Path]]:
    """Write the checkpoints (once; reused when present): (sharded index, .weights.h5) pairs."""
    pairs = [
        (directory / f"ckpt_{i}.weights.json", directory / f"ckpt_{i}.weights.h5")
        for i in range(spec["n"])
    ]
    stamp = directory / "spec.json"
    if (
        stamp.exists()
        and json.loads(stamp.read_text()) == spec
        and all(a.exists() and b.exists() for a, b in pairs)
    ):
        return pairs
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    subprocess.run(
        [sys.executable, __file__, "--generate", json.dumps({**spec, "dir": str(directory)})],
        check=True,
        cwd=BENCH_DIR,
    )
    stamp.write_text(json.dumps(spec))
    return pairs


def _write_checkpoints(spec: dict) -> None:  # pragma: no cover - runs in a subprocess
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras_gen

    model = keras_gen.build_model(spec["input_dim"], spec["units"], batchnorm=False)
    directory = Path(spec["dir"])
    for i in range(spec["n"]):
        model.set_weights(keras_gen.random_weights(model, 1000 + i))
        model.save_weights(directory / f"ckpt_{i}.weights.json", max_shard_size=spec["shard_gb"])
        model.save_weights(directory / f"ckpt_{i}.weights.h5")


def shard_files(index: Path) -> list[Path]:
    names: dict[str, None] = {}
    for value in json.loads(index.read_text())["weight_map"].values():
        for name in value if isinstance(value, list) else [value]:
            names.setdefault(name)
    return [index.parent / name for name in names]


def _same_tensors(sharded_out: Path, unsharded_out: Path) -> str:
    import h5py
    import numpy as np

    found: dict[str, np.ndarray] = {}
    for shard in shard_files(sharded_out):
        with h5py.File(shard, "r") as h5:
            h5.visititems(
                lambda n, o: found.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
            )
    with h5py.File(unsharded_out, "r") as h5:
        names: list[str] = []
        h5.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if sorted(names) != sorted(found):
            return "WRONG OUTPUT (tensor sets differ)"
        for name in names:
            if not np.array_equal(h5[name][()], found[name]):
                return f"WRONG OUTPUT ({name} differs)"
    return f"ok (both outputs hold the same {len(names)} tensors bit for bit)"


def run(
    wavg: Path, out_dir: Path, results_dir: Path, quick: bool, budget_s: float, keep: bool = False
) -> str:
    """Measure the workload, write ``sharded.md`` in `results_dir`, return the closing note.

    The generated checkpoints are deleted afterwards unless `keep`."""
    spec = QUICK if quick else FULL
    data = out_dir / ("sharded-quick" if quick else "sharded")
    pairs = generate(data, spec)
    indexes = [a for a, _ in pairs]
    singles = [b for _, b in pairs]
    files = [p for index in indexes for p in [index, *shard_files(index)]]
    measure.warm_cache(files + singles)
    outputs = out_dir / "outputs" / "sharded"
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir(parents=True)
    sharded_out, single_out = outputs / "avg.weights.json", outputs / "avg.weights.h5"

    def fresh() -> None:
        for path in outputs.iterdir():
            path.unlink()
        measure.settle()

    def combine(inputs: list[Path], out: Path) -> measure.Run:
        cmd = [str(wavg), "combine", *map(str, inputs), "-o", str(out)]
        result = measure.run_best(cmd, 1800.0, before=fresh, budget_s=budget_s)
        if not result.ok:
            sys.exit(f"bench: sharded workload: wavg failed:\n{result.stderr_tail}")
        return result

    # Alternate the two, twice, and keep each one's best: the machine's load drifts.
    rounds = [(combine(singles, single_out), combine(indexes, sharded_out)) for _ in range(2)]
    unsharded = min((u for u, _ in rounds), key=lambda r: r.wall_s)
    sharded = min((s for _, s in rounds), key=lambda r: r.wall_s)
    reference = outputs.parent / "sharded-reference.weights.h5"
    combine(singles, single_out)
    os.replace(single_out, reference)
    combine(indexes, sharded_out)
    status = _same_tensors(sharded_out, reference)
    floor = measure.run_best(measure.dd_read_cmd(files), 600.0, budget_s=budget_s)
    figures = Figures(
        sharded_s=sharded.wall_s,
        unsharded_s=unsharded.wall_s,
        read_floor_s=floor.wall_s,
        sharded_rss=sharded.peak_rss,
        unsharded_rss=unsharded.peak_rss,
        shards_per_file=len(shard_files(indexes[-1])),
        file_mb=sum(p.stat().st_size for p in shard_files(indexes[-1])) / 1e6,
        n=len(indexes),
        status=status,
    )
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "sharded.md").write_text(figures.markdown())
    print(figures.markdown())
    shutil.rmtree(outputs, ignore_errors=True)
    reference.unlink()
    if not keep:
        shutil.rmtree(data, ignore_errors=True)
    return figures.note()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--results", type=Path, help="where sharded.md goes (default OUT/results)")
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        _write_checkpoints(json.loads(args.generate))
        return 0
    wavg = executable.find_wavg()
    results = args.results or args.out / "results"
    print(run(wavg, args.out, results, args.quick, 2.0 if args.quick else 12.0, args.keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
