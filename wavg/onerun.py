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
