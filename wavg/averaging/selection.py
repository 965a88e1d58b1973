"""Choose which of the ordered checkpoints to average: every K-th epoch, the N newest, or the
N best by a logged metric, for one window size or several at once.

It works on the epoch-ordered list `wavg.averaging.ordering` makes and on the values
`wavg.averaging.metrics` reads; it weights nothing and opens no checkpoint.

The rules scripts rely on: ``every`` filters first, by epoch number, counting back from the
newest (newest, newest - K, ...); ``last`` / ``best`` then choose among what is left; ties in
the metric rank the newer epoch first; a checkpoint with no value or a NaN value is an error
naming it. `ModelCheckpoint` counts ``{epoch}`` from 1, `CSVLogger` and `History` from 0: with
``epoch_base=1`` (default) a file of epoch E is matched to row E - 1, with 0 to row E.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from wavg.averaging.metrics import lower_is_better, read_metrics_file, value_in_name
from wavg.averaging.ordering import epoch_numbers, stem
from wavg.errors import MetricsError, UsageError
from wavg.storage.locations import Location


@dataclass(frozen=True)
class Metric:
    """A metric to rank by, and whether lower values are better."""

    name: str
    lower_is_better: bool

    @classmethod
    def parse(cls, text: str) -> Metric:
        """``val_loss`` (direction inferred, see `lower_is_better`), ``val_acc:max``, ``x:min``."""
        name, _, mode = text.strip().partition(":")
        if not name or mode not in ("", "min", "max"):
            raise UsageError(f"--by {text!r}: give METRIC, METRIC:min or METRIC:max")
        return cls(name, lower_is_better(name) if not mode else mode == "min")


@dataclass(frozen=True)
class Window:
    """One selection: its members (oldest first), their epochs and, when a metric was asked
    for, their values; `size` is the N it was asked with."""

    size: int | None
    members: list[Location]
    epochs: list[int | None]
    values: list[float] | None


def parse_counts(text: str, option: str) -> list[int]:
    """``5`` or ``3,5,10``: positive whole numbers, each given once."""
    try:
        counts = [int(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a comma-separated list of counts") from None
    if any(n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise UsageError(f"{option}: counts must be positive and different, got {text!r}")
    return counts


def metric_values(
    paths: Sequence[Location],
    epochs: Sequence[int | None],
    metric: Metric,
    metrics_file: str | os.PathLike[str] | None = None,
    epoch_base: int = 1,
) -> list[float]:
    """The value of `metric` for each path: from `metrics_file` when given (rows matched by
    `epochs`, see the module docstring), else from the names. Refuses (naming the file) a
    checkpoint without a value, or with a NaN one."""
    if epoch_base not in (0, 1):
        raise UsageError(f"--metrics-epoch-base must be 0 or 1, got {epoch_base!r}")
    values: list[float | None]
    if metrics_file is not None:
        rows = read_metrics_file(metrics_file)
        values = []
        for path, epoch in zip(paths, _known(paths, epochs), strict=True):
            row = rows.get(epoch - epoch_base)
            if row is None:
                raise MetricsError(
                    path,
                    f"no row for epoch {epoch} in {os.fspath(metrics_file)} (row "
                    f"{epoch - epoch_base} with --metrics-epoch-base {epoch_base})",
                )
            if metric.name not in row:
                raise MetricsError(
                    metrics_file, f"no column {metric.name!r}; it has {', '.join(sorted(row))}"
                )
            values.append(row[metric.name])
    else:
        values = [value_in_name(stem(p), metric.name, str(p)) for p in paths]
    for path, value in zip(paths, values, strict=True):
        where = "its row of the metrics file" if metrics_file is not None else "its name"
        if value is None:
            raise MetricsError(
                path,
                f"no {metric.name} value in its name; pass --metrics FILE "
                "(a CSVLogger CSV or History JSON)",
            )
        if math.isnan(value):
            raise MetricsError(path, f"{metric.name} is NaN in {where}; it cannot be ranked")
    return values  # type: ignore[return-value]


def _known(paths: Sequence[Location], epochs: Sequence[int | None]) -> list[int]:
    """`epochs`, refusing a path whose name has no epoch number."""
    for path, epoch in zip(paths, epochs, strict=True):
        if epoch is None:
            raise MetricsError(path, "no epoch number in the name to select by")
    return list(epochs)  # type: ignore[arg-type]


def every_kth(paths: Sequence[Location], epochs: Sequence[int | None], k: int) -> list[int]:
    """The positions of the newest, newest - K, newest - 2K, ... epochs in `paths`."""
    if k < 1:
        raise UsageError(f"--every must be a positive whole number, got {k!r}")
    known = _known(paths, epochs)
    return [i for i, e in enumerate(known) if (known[-1] - e) % k == 0]


def best_positions(values: Sequence[float], n: int, metric: Metric) -> list[int]:
    """The positions of the `n` best of `values` (ties: the later, newer one first), in
    their original (epoch) order."""
    sign = 1.0 if metric.lower_is_better else -1.0
    ranked = sorted(range(len(values)), key=lambda i: (sign * values[i], -i))
    return sorted(ranked[:n])


def select_windows(
    ordered: Sequence[Location],
    *,
    last: Sequence[int] | None = None,
    best: Sequence[int] | None = None,
    by: Metric | None = None,
    every: int | None = None,
    metrics_file: str | os.PathLike[str] | None = None,
    epoch_base: int = 1,
) -> list[Window]:
    """The windows to average, each oldest first, from `ordered` (oldest first).

    Without `last` and `best` there is one window of everything left after `every`. `best`
    needs `by`; `by` alone only reports the values.
    """
    if last is not None and best is not None:
        raise UsageError("give --last or --best, not both")
    if best is not None and by is None:
        raise UsageError("--best needs --by METRIC")
    if by is None and metrics_file is not None:
        raise UsageError("--metrics needs --by METRIC")
    # Epochs are read from all the names at once: the number that differs between them.
    all_epochs = epoch_numbers(ordered)
    kept = every_kth(ordered, all_epochs, every) if every is not None else range(len(ordered))
    pool = [ordered[i] for i in kept]
    epochs = [all_epochs[i] for i in kept]
    values = metric_values(pool, epochs, by, metrics_file, epoch_base) if by else None
    counts = best if best is not None else last
    for n in counts or ():
        if n > len(pool):
            option = "--best" if best is not None else "--last"
            left = f" kept by --every {every}" if every is not None else " given"
            raise UsageError(  # refused, not clamped: fewer inputs would be a different average
                f"{option} {n} asks for more checkpoints than the {len(pool)}{left}; pass "
                f"{option} {len(pool)} or fewer, or leave {option} out to average all of them"
            )
    if counts is None:
        return [Window(None, pool, epochs, values)]
    windows = []
    for n in counts:
        if best is not None:
            assert by is not None and values is not None
            chosen = best_positions(values, n, by)
        else:
            chosen = list(range(len(pool) - n, len(pool)))
        picked = [values[i] for i in chosen] if values is not None else None
        windows.append(Window(n, [pool[i] for i in chosen], [epochs[i] for i in chosen], picked))
    return windows
