"""wavg: average the weights of Keras checkpoints, one tensor at a time.

Public API (the CLI is a thin layer over these):

- `combine(paths, out, scheme=..., alpha=..., weights=...)` averages checkpoint files into one;
- `plan_combine(...)` orders the files and computes the weights without reading any data;
- `scheme_weights(n, scheme, alpha)` gives the normalised weights of a scheme;
- `order_checkpoints(paths, order, last)` puts files oldest first by the epoch in their names.

Importing wavg never imports Keras or a deep-learning framework; only `wavg.train`,
`wavg.evaluate` and `wavg.keras` import Keras (on whichever backend ``KERAS_BACKEND`` selects),
lazily, and they need the ``keras`` extra (`wavg.extras`). A plain ``pip install wavg`` is
enough for `combine`.
"""

from wavg.combine import CombinePlan, CombineSummary, combine, plan_combine, run_plan
from wavg.errors import WavgError
from wavg.ordering import order_checkpoints
from wavg.schemes import scheme_weights

__all__ = [
    "CombinePlan",
    "CombineSummary",
    "WavgError",
    "combine",
    "order_checkpoints",
    "plan_combine",
    "run_plan",
    "scheme_weights",
]
__version__ = "0.1.0"  # the one place the version is set (pyproject reads it)
