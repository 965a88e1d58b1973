"""Weights for the averaging schemes: pure functions, no I/O.

Weights are returned in file order, oldest first and newest last, normalised to sum to 1.
With i = 1 for the newest of n checkpoints:

- ``equal``:  1/n each;
- ``linear``: (n - i + 1)/n, the newest counts most;
- ``exp``:    exp(-i/alpha); computed as exp(-(i-1)/alpha), which normalises to the same
  weights but never underflows to an all-zero vector for a tiny alpha;
- ``wsm-linear``, ``wsm-cosine``, ``wsm-1-sqrt``: the merge coefficients that emulate a
  learning-rate decay of that shape over the window (WSM, Tian et al., ICLR 2026; see
  `wsm_weights`). These are not "newest weighted most": 1-sqrt weights the oldest most and
  cosine peaks in the middle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from wavg.errors import UsageError

WSM_DECAYS = {
    "wsm-linear": lambda x: 1.0 - x,
    "wsm-cosine": lambda x: (1.0 + np.cos(np.pi * x)) / 2.0,
    "wsm-1-sqrt": lambda x: 1.0 - np.sqrt(x),
}
SHAPES = ("equal", "linear", "exp")  # the newest weighted most (equal: as much)
SCHEMES = (*SHAPES, *WSM_DECAYS)
DEFAULT_ALPHA = 2.0


def scheme_weights(
    n: int,
    scheme: str = "equal",
    alpha: float = DEFAULT_ALPHA,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """Normalised float64 weights for `n` checkpoints in file order (oldest first).

    `weights`, when given, are custom raw weights in the same order and override `scheme`
    (pass ``scheme="custom"`` or leave the default). Raises `UsageError` for anything that
    cannot be a weighting: n < 1, an unknown scheme, alpha <= 0, or custom weights that are
    the wrong count, negative, non-finite or sum to zero.

    >>> scheme_weights(3, "linear").round(3).tolist()
    [0.167, 0.333, 0.5]
    """
    raw = raw_weights(n, scheme, alpha, weights)
    return raw / raw.sum()


def raw_weights(
    n: int,
    scheme: str = "equal",
    alpha: float = DEFAULT_ALPHA,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """The same weights before normalisation, as exact as float64 allows.

    Averaging with these and dividing by their sum once avoids rounding every weight:
    equal is all ones and linear the integers 1..n, so those averages are exact up to the
    final rounding; exp is 1 for the newest. Same contract and errors as `scheme_weights`.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise UsageError(f"need at least one checkpoint to average, got {n!r}")
    if weights is not None:
        if scheme not in ("equal", "custom"):
            raise UsageError("give either a scheme or custom weights, not both")
        return checked_custom(weights, n)
    if scheme == "equal":
        return np.ones(n)
    if scheme == "linear":
        return np.arange(1, n + 1, dtype=np.float64)
    if scheme == "exp":
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
            raise UsageError(f"--alpha must be a positive number, got {alpha!r}")
        age = np.arange(n - 1, -1, -1, dtype=np.float64)  # 0 for the newest
        return np.exp(-age / alpha)
    if scheme in WSM_DECAYS:
        return wsm_weights(n, scheme)
    if scheme == "custom":
        raise UsageError("scheme 'custom' needs --weights")
    raise UsageError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def wsm_weights(n: int, scheme: str) -> np.ndarray:
    """WSM coefficients for `n` checkpoints theta_0 (oldest) ... theta_k (newest), k = n - 1.

    With the decay shape d of `scheme` on [0, 1] and w_i = d(i / n) for i = 1..k:
    c_0 = 1 - w_1, c_j = w_j - w_{j+1} (0 < j < k), c_k = w_k. They telescope to a sum of 1
    and are non-negative because d never increases; one checkpoint gets 1, and wsm-linear
    is the equal average.

    >>> wsm_weights(4, "wsm-1-sqrt").round(3).tolist()
    [0.5, 0.207, 0.159, 0.134]
    """
    w = WSM_DECAYS[scheme](np.arange(1, n, dtype=np.float64) / n)
    upper = np.concatenate(([1.0], w))  # w_0 = d(0) = 1
    lower = np.concatenate((w, [0.0]))  # w_n = d(1) = 0
    return upper - lower


def checked_custom(weights: Sequence[float], n: int) -> np.ndarray:
    """Custom weights for `n` checkpoints as float64, refused unless they can weight."""
    try:
        raw = np.asarray([float(w) for w in weights], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"weights must be numbers: {exc}") from None
    if raw.size != n:
        raise UsageError(f"got {raw.size} weights for {n} checkpoints; give one per checkpoint")
    if not np.isfinite(raw).all():
        raise UsageError("weights must be finite numbers")
    if (raw < 0).any():
        raise UsageError("weights must not be negative")
    if not raw.sum() > 0:
        raise UsageError("weights must not all be zero")
    return raw


def parse_weight_list(text: str) -> list[float]:
    """Parse the CLI's ``--weights 1,2,3`` into floats, with a usage error for bad items."""
    items = [item.strip() for item in text.split(",")]
    try:
        return [float(item) for item in items]
    except ValueError:
        bad = next(item for item in items if not _is_float(item))
        raise UsageError(f"--weights: {bad!r} is not a number") from None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
