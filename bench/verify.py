"""Check an averaged checkpoint against the float64 numpy average of its inputs.

Run after every timed wavg run (outside the timing) so that a fast but wrong combine fails
the benchmark. The reference is computed in bounded row blocks, so checking a 32 GB input set
does not need 32 GB of memory; above `full_limit` bytes only the first rows of each tensor
are checked (a spot check, reported as such) to keep the run's length sane.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from h5tensors import open_weights, tensor_names

BLOCK_BYTES = 64 * 1024 * 1024
SPOT_ROWS = 256
REL_TOLERANCE = 1e-6
# Optimizer state is not a model weight: wavg copies it from the newest file (its layouts
# say so), as it does any non-float dataset (an Adam step counter, say).
OPTIMIZER_GROUPS = ("optimizer_weights", "optimizer")


@dataclass(frozen=True)
class Check:
    """Outcome of comparing one output file with the reference average."""

    ok: bool
    max_abs_diff: float
    max_rel_diff: float
    n_tensors: int
    spot: bool
    message: str = ""

    def summary(self) -> str:
        """One short cell for the table."""
        if not self.ok:
            return f"WRONG: {self.message}"
        kind = "spot" if self.spot else "ok"
        return f"{kind} {self.max_rel_diff:.1e}"


def is_averaged(name: str, dtype: np.dtype) -> bool:
    """True for a model weight (averaged); False for what is copied from the newest input."""
    return np.issubdtype(dtype, np.floating) and name.split("/", 1)[0] not in OPTIMIZER_GROUPS


def _row_blocks(shape: tuple[int, ...], itemsize: int, limit: int | None) -> list:
    """Slices over the first axis with about BLOCK_BYTES each, up to `limit` rows."""
    if not shape:
        return [()]
    rows = shape[0] if limit is None else min(shape[0], limit)
    row_bytes = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    step = max(1, BLOCK_BYTES // row_bytes)
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


def verify_average(
    inputs: list[Path], weights: list[float], output: Path, full_limit: int = 8 << 30
) -> Check:
    """Compare every tensor of `output` with sum(w_i * input_i) computed in float64."""
    total = sum(p.stat().st_size for p in inputs)
    spot_rows = SPOT_ROWS if total > full_limit else None
    worst_abs = worst_rel = 0.0
    with ExitStack() as stack:
        sources = [stack.enter_context(open_weights(p)) for p in inputs]
        result = stack.enter_context(open_weights(output))
        names = tensor_names(result)
        expected = tensor_names(sources[-1])
        if sorted(names) != sorted(expected):
            missing = sorted(set(expected) - set(names))[:3]
            extra = sorted(set(names) - set(expected))[:3]
            return Check(False, np.inf, np.inf, len(names), False, f"tensors {missing=} {extra=}")
        for name in names:
            out_ds = result[name]
            if out_ds.shape != sources[-1][name].shape:
                return Check(False, np.inf, np.inf, len(names), False, f"shape of {name}")
            averaged = is_averaged(name, out_ds.dtype)
            for block in _row_blocks(out_ds.shape, out_ds.dtype.itemsize, spot_rows):
                got = out_ds[block].astype(np.float64)
                if averaged:
                    reference = np.zeros_like(got)
                    for source, weight in zip(sources, weights, strict=True):
                        reference += weight * source[name][block].astype(np.float64)
                else:
                    reference = sources[-1][name][block].astype(np.float64)
                diff = np.abs(got - reference)
                scale = float(np.max(np.abs(reference), initial=0.0))
                worst_abs = max(worst_abs, float(np.max(diff, initial=0.0)))
                worst_rel = max(worst_rel, float(np.max(diff, initial=0.0)) / max(scale, 1e-30))
    ok = worst_rel <= REL_TOLERANCE
    message = "" if ok else f"max relative diff {worst_rel:.2e} > {REL_TOLERANCE:.0e}"
    return Check(ok, worst_abs, worst_rel, len(names), spot_rows is not None, message)
