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

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wavg.combine import CombinePlan, CombineSummary, combine, plan_combine, run_plan
    from wavg.errors import WavgError
    from wavg.ordering import order_checkpoints
    from wavg.schemes import scheme_weights

# The public names are loaded on first use (PEP 562), so that importing the package (as the
# console script does before anything else) loads no numpy: `wavg.cli` sets how numpy's BLAS
# starts before it is loaded.
_HOMES = {
    "CombinePlan": "wavg.combine",
    "CombineSummary": "wavg.combine",
    "combine": "wavg.combine",
    "plan_combine": "wavg.combine",
    "run_plan": "wavg.combine",
    "WavgError": "wavg.errors",
    "order_checkpoints": "wavg.ordering",
    "scheme_weights": "wavg.schemes",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'wavg' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps ``wavg.combine`` the function: importing the submodule of the same name (as
    ``from wavg.combine import ...`` anywhere does) would otherwise bind the module there."""

    def __setattr__(self, name: str, value: object) -> None:
        if (
            isinstance(value, types.ModuleType)
            and getattr(value, "__name__", "") == (f"{__name__}.{name}")
            and name in _HOMES
        ):
            return  # the submodule stays reachable as sys.modules["wavg.combine"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
