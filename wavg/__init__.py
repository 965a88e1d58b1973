"""wavg: average the weights of Keras checkpoints, one tensor at a time.

Public API (the CLI is a thin layer over these):

- `combine(paths, out, scheme=..., alpha=..., weights=...)` averages checkpoint files into one
  (`paths`: a list of names, or one path or quoted glob such as ``"ckpt/model_49*.h5"``);
- `combine(..., part=(I, N))` / `commit(out)` write a sharded output in N independent parts,
  then join them (see docs/distributed.md);
- `plan_combine(...)` orders and selects the files (``last``, ``every``, ``best``/``by``) and
  computes the weights without reading any data;
- `plan_windows(...)` and `run_windows(plan, outs)` average several windows (``last=[3, 5]``)
  in one pass, each input read once;
- `scheme_weights(n, scheme, alpha)` gives the normalised weights of a scheme;
- `order_checkpoints(paths, order, last)` puts files oldest first by the epoch in their names.

Importing wavg never imports Keras or a deep-learning framework; only the Keras-side
commands (`wavg.workflows`) and `wavg.keras` import Keras (on whichever backend
``KERAS_BACKEND`` selects), lazily, and they need the ``keras`` extra (`wavg.extras`). A plain ``pip install wavg`` is
enough for `combine`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wavg.averaging.engine import (
        CombinePlan,
        CombineSummary,
        WindowsPlan,
        WindowsSummary,
        combine,
        plan_combine,
        plan_windows,
        run_plan,
        run_windows,
    )
    from wavg.averaging.ordering import order_checkpoints
    from wavg.averaging.partition import CommitSummary, commit
    from wavg.averaging.schemes import scheme_weights
    from wavg.errors import WavgError

# The public names are loaded on first use (PEP 562), so that importing the package (as the
# console script does before anything else) loads no numpy: `wavg.cli` sets how numpy's BLAS
# starts before it is loaded. No submodule is named like a public function, so importing one
# never rebinds a public name.
_HOMES = {
    "CombinePlan": "wavg.averaging.engine",
    "CombineSummary": "wavg.averaging.engine",
    "combine": "wavg.averaging.engine",
    "plan_combine": "wavg.averaging.engine",
    "run_plan": "wavg.averaging.engine",
    "commit": "wavg.averaging.partition",
    "CommitSummary": "wavg.averaging.partition",
    "WindowsPlan": "wavg.averaging.engine",
    "WindowsSummary": "wavg.averaging.engine",
    "plan_windows": "wavg.averaging.engine",
    "run_windows": "wavg.averaging.engine",
    "WavgError": "wavg.errors",
    "order_checkpoints": "wavg.averaging.ordering",
    "scheme_weights": "wavg.averaging.schemes",
}


# Modules documented by their old flat names (``wavg.bn_update.bn_update(...)``), reachable
# after a plain ``import wavg``; each loads (and may need Keras) only when first used.
_MODULES = {
    "bn_update": "wavg.workflows.bn_update",
    "evaluate": "wavg.workflows.evaluate",
    "soup": "wavg.workflows.soup",
    "train": "wavg.workflows.train",
    "errors": "wavg.errors",
}


def __dir__() -> list[str]:
    """The public API (functions, classes, the documented modules), loaded or not."""
    return sorted({*__all__, *_MODULES, "__version__"})


def __getattr__(name: str) -> object:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    else:
        raise AttributeError(f"module 'wavg' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "CombinePlan",
    "CombineSummary",
    "CommitSummary",
    "WavgError",
    "WindowsPlan",
    "WindowsSummary",
    "combine",
    "commit",
    "order_checkpoints",
    "plan_combine",
    "plan_windows",
    "run_plan",
    "run_windows",
    "scheme_weights",
]
__version__ = "0.1.0"  # the one place the version is set (pyproject reads it)
