"""Do these checkpoints look like epochs of one training run? The limits and the rules.

Averaging weights helps only along one run: independently trained models have unaligned
weights, and their average is usually far worse than either. `wavg evaluate` (on whole
weight vectors) and `wavg combine` (on what it sees while streaming) share these limits and
words. This module only judges numbers; it never reads a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Consecutive epochs of one run differ by about a percent of their weights' size; two
# separately trained models by about as much as the weights themselves.
SPREAD_LIMIT = 0.25
# With three or more checkpoints, one step this many times the median step is a jump.
JUMP_LIMIT = 10.0


_WHY = (
    "(epochs of one run usually differ by about 1%); if they come from separate training "
    "runs their weights are not aligned and the averages will be poor"
)


def not_one_run(relative: float) -> str:
    """The warning for checkpoints that differ by `relative` (a fraction of their size)."""
    return f"the checkpoints differ by up to {relative:.0%} of their weights' size {_WHY}"


def distance_warnings(
    paths: Sequence[Path], squared_distances: Sequence[float], squared_size: float
) -> list[str]:
    """Warnings from each input's squared L2 distance to the newest (last) input and the
    newest's squared L2 norm, over the averaged tensors (what `combine` measures).

    An input farther from the newest than `SPREAD_LIMIT` times the newest's size is a
    warning naming the farthest. Non-finite or empty measures (NaN weights averaged with
    --allow-nonfinite, nothing averaged) give no warning.
    """
    if len(paths) < 2 or not (squared_size > 0 and math.isfinite(squared_size)):
        return []
    size = math.sqrt(squared_size)
    relative = [math.sqrt(d) / size if math.isfinite(d) else 0.0 for d in squared_distances]
    worst = max(range(len(paths) - 1), key=relative.__getitem__)
    if not relative[worst] > SPREAD_LIMIT:
        return []
    far = sum(r > SPREAD_LIMIT for r in relative)
    others = f" (and {far - 1} more)" if far > 1 else ""
    return [
        f"{paths[worst].name}{others} differs from the newest checkpoint, {paths[-1].name}, "
        f"by {relative[worst]:.0%} of its weights' size {_WHY}"
    ]


def one_run_warnings(vectors: Sequence[np.ndarray], paths: Sequence[Path]) -> list[str]:
    """Warnings when the checkpoints do not look like consecutive epochs of one run.

    Averaging weights only makes sense for checkpoints of one training run:
    independently trained models have unaligned weights, and their average is usually far worse
    than either. With w_i the flattened weights (oldest to newest), the result carries a warning
    when (a) the members' spread ``max_i |w_i - mean(w)|`` exceeds 25% of their typical size
    ``mean_i |w_i|`` (consecutive epochs of one run differ by about a percent), or (b) with three or
    more members, one step ``|w_(k+1) - w_k|`` is more than 10 times the median step (a file from
    another run, or a gap of many epochs, in the middle of the list).
    """
    if len(vectors) < 2:
        return []
    stacked = np.stack(vectors)
    size = float(np.linalg.norm(stacked, axis=1).mean())
    spread = float(np.linalg.norm(stacked - stacked.mean(axis=0), axis=1).max())
    found = []
    if size > 0 and spread / size > SPREAD_LIMIT:
        found.append(not_one_run(spread / size))
    steps = np.linalg.norm(np.diff(stacked, axis=0), axis=1)
    typical = float(np.median(steps))
    if len(vectors) >= 3 and typical > 0 and steps.max() > JUMP_LIMIT * typical:
        k = int(steps.argmax())
        found.append(
            f"the step from {paths[k].name} to {paths[k + 1].name} is "
            f"{steps[k] / typical:.0f}x the median step between consecutive checkpoints; "
            "are they from the same run, without a gap?"
        )
    return found
