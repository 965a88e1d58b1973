"""`wavg evaluate`: does averaging the last checkpoints beat the checkpoints themselves?

For n = 1 ... N it scores, on the test split, with the model's own compiled loss and metrics:

- ``single``: the n-th newest checkpoint alone (n = 1 is the last epoch);
- one column per weighting (``equal``, ``linear``, ``exp``, and ``exp(a=...)`` for each extra
  decay rate): the weight average of the n newest, made by `wavg.combine` into a temporary
  directory and loaded back, exactly as a user would;
- ``<average>+bn`` (with ``bn_data``): each average after `wavg.workflows.bn_update` recomputed its
  BatchNorm statistics;
- ``best:<average>`` (with ``by``): the same weight average of the n best checkpoints by a
  logged metric (`wavg.averaging.selection`), so row n compares ``--last n`` (the
  ``<average>`` column) with ``--best n --by METRIC`` side by side; ``every`` keeps every
  K-th epoch first, for all columns;
- ``greedy``: the greedy soup of the n newest (`wavg.workflows.soup`), chosen on held-out data, never
  on the data the table reports;
- ``ensemble``: the mean of the n newest checkpoints' predictions (output averaging, which
  needs all n models at prediction time).

Each checkpoint is loaded once and its predictions cached; averages are loaded as weights into
one model built from the newest checkpoint (or ``--model``), so a run over N files loads the
architecture once and N + N * schemes weight files.

"One run?" check: `wavg.averaging.onerun.one_run_warnings` on the members' weight vectors.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wavg.averaging.engine import combine as wavg_combine
from wavg.averaging.onerun import one_run_warnings
from wavg.averaging.ordering import order_checkpoints
from wavg.averaging.schemes import DEFAULT_ALPHA, SCHEMES, SHAPES
from wavg.averaging.selection import Metric, best_positions, select_windows
from wavg.errors import CheckpointError, UsageError
from wavg.formats.registry import local_copies
from wavg.storage.globs import expand_inputs
from wavg.workflows.data import BLOBS, BUILT_IN, Dataset, load_data, load_validation, same_data_file
from wavg.workflows.model_loading import is_weights_only
from wavg.workflows.scoring import (
    Scorer,
    check_metric,
    compiled_model_for,
    higher_is_better,
    primary_metric,
    suffix_of,
)
from wavg.workflows.soup import Prepare, SubsetScores, bn_preparer, rank
from wavg.workflows.soup import greedy as greedy_soup

SCHEMA = "wavg.evaluate/1"
SINGLE, ENSEMBLE, GREEDY = "single", "ensemble", "greedy"
BN_SUFFIX = "+bn"
BEST_PREFIX = "best:"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Average:
    """One weight-average column: a scheme and, for ``exp``, its decay rate alpha."""

    scheme: str
    alpha: float = DEFAULT_ALPHA
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.scheme


@dataclass
class EvaluationResult:
    """Scores per n (1-based, n-th newest / n newest) and column; see `to_dict` for the schema."""

    checkpoints: list[Path]  # oldest first, newest last
    epochs: list[int | None]
    data: str
    metrics: list[str]
    columns: list[str]
    scores: list[dict[str, dict[str, float]]]  # scores[n - 1][column][metric]
    warnings: list[str] = field(default_factory=list)
    best_by: str | None = None  # the metric the best:<average> columns rank by

    @property
    def primary_metric(self) -> str:
        """The score tables and plots show: the first compiled metric, else the loss."""
        return primary_metric(self.metrics)

    def check_metric(self, metric: str | None) -> str:
        """`metric` if the model reports it (None: the primary metric), else a usage error."""
        return check_metric(metric, self.metrics)

    def member(self, n: int) -> Path:
        """The n-th newest checkpoint (n = 1 is the last epoch)."""
        return self.checkpoints[-n]

    def best(self, column: str, metric: str | None = None) -> tuple[int, float]:
        """The n with the best score in a column, and that score (ties: the smallest n)."""
        metric = self.check_metric(metric)
        values = [row[column][metric] for row in self.scores]
        pick = max if higher_is_better(metric) else min
        value = pick(values)
        return values.index(value) + 1, value

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document (schema ``wavg.evaluate/1``; keys are stable)."""
        best_by = {"best_by": self.best_by} if self.best_by is not None else {}
        return {
            "schema": SCHEMA,
            "data": self.data,
            "metrics": self.metrics,
            "primary_metric": self.primary_metric,
            "higher_is_better": higher_is_better(self.primary_metric),
            "columns": self.columns,
            "checkpoints": [str(p) for p in reversed(self.checkpoints)],
            "rows": [
                {
                    "n": n,
                    "checkpoint": str(self.member(n)),
                    "epoch": self.epochs[-n],
                    "scores": row,
                }
                for n, row in enumerate(self.scores, start=1)
            ],
            "best": {
                column: dict(zip(("n", "value"), self.best(column), strict=True))
                for column in self.columns
            },
            "warnings": self.warnings,
            **best_by,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_csv(self) -> str:
        """Long format, one score per line: ``n,epoch,checkpoint,column,metric,value``."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["n", "epoch", "checkpoint", "column", "metric", "value"])
        for n, row in enumerate(self.scores, start=1):
            for column in self.columns:
                for metric in self.metrics:
                    value = row[column][metric]
                    epoch = self.epochs[-n]
                    writer.writerow([n, epoch, self.member(n), column, metric, repr(value)])
        return out.getvalue()


def averages_for(
    schemes: Sequence[str] = SHAPES,
    alpha: float = DEFAULT_ALPHA,
    alphas: Sequence[float] | None = None,
) -> list[Average]:
    """The weight-average columns: each scheme, then ``exp(a=...)`` for each extra alpha."""
    columns = []
    for scheme in schemes:
        if scheme not in SCHEMES:
            raise UsageError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        columns.append(Average(scheme, alpha if scheme == "exp" else DEFAULT_ALPHA))
    for a in alphas or ():
        if not (math.isfinite(a) and a > 0):
            raise UsageError(f"--alphas: every alpha must be a positive number, got {a}")
        columns.append(Average("exp", a, f"exp(a={a:g})"))
    unique = {(c.scheme, c.alpha): c for c in reversed(columns)}  # first label of a duplicate
    return [c for c in columns if unique[(c.scheme, c.alpha)] is c]


def parse_list(text: str | None, option: str, convert: Callable[[str], Any] = str) -> list[Any]:
    """Split a CLI list such as ``equal,linear`` or ``0.5,1,2``; a bad item is a usage error."""
    if text is None:
        return []
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise UsageError(f"{option}: cannot read {text!r} as a comma-separated list") from None


def evaluate(
    paths: Sequence[str | os.PathLike[str]],
    data: str | os.PathLike[str] | Dataset | None = None,
    schemes: Sequence[str] = SHAPES,
    alpha: float = DEFAULT_ALPHA,
    alphas: Sequence[float] | None = None,
    max_n: int | None = None,
    *,
    ensemble: bool = True,
    greedy: bool = True,
    soup_data: str | os.PathLike[str] | Dataset | None = None,
    bn_data: str | os.PathLike[str] | Dataset | None = None,
    batch_size: int = 32,
    model: str | os.PathLike[str] | None = None,
    custom_objects: str | None = None,
    trust: bool = False,
    order: str = "natural",
    progress: Progress | None = None,
    by: str | None = None,
    every: int | None = None,
    metrics: str | os.PathLike[str] | None = None,
    metrics_epoch_base: int = 1,
) -> EvaluationResult:
    """Score single checkpoints, weight averages, the greedy soup and the output ensemble for
    n = 1 ... N.

    `paths` are ordered as `wavg.combine` orders them (by the epoch in the name, newest last);
    N is `max_n` or the number of files. `data` is ``"blobs"`` (default), an ``.npz`` path or a
    `Dataset`. Weights-only files need `model` (a ``.keras`` model) for the architecture.

    ``greedy`` is the greedy soup of the n newest (`wavg.workflows.soup`), chosen on `soup_data` (an
    ``.npz`` whose ``x_test, y_test`` are held out, never `data` itself; with the built-in
    data and no `soup_data`, the blobs validation split) and scored like every column; without
    held-out data the column is left out. With `bn_data`, each average column gets a twin
    ``<name>+bn``: the same average after `wavg.workflows.bn_update` on `bn_data`'s ``x_train``.
    `progress(done, total)` is called as the work advances. `every`, `by`, `metrics` and
    `metrics_epoch_base` select as `wavg.combine` does (`wavg.averaging.selection`): `every`
    thins the checkpoints first; `by` adds a ``best:<average>`` column per average, the
    average of the n best by that metric.
    """
    metric = Metric.parse(by) if by is not None else None
    (pool,) = select_windows(
        order_checkpoints(expand_inputs(paths), order=order),
        by=metric,
        every=every,
        metrics_file=metrics,
        epoch_base=metrics_epoch_base,
    )
    ordered = pool.members
    count = max_n if max_n is not None else len(ordered)
    if not 1 <= count <= len(ordered):
        raise UsageError(f"--max-n must be between 1 and {len(ordered)} (the files given)")
    shown = ordered[-count:]
    columns = averages_for(schemes, alpha, alphas)
    held_out = _held_out(data, soup_data) if greedy else None
    dataset = data if isinstance(data, Dataset) else load_data(data)
    with tempfile.TemporaryDirectory(prefix="wavg-evaluate-") as tmp:
        scratch = Path(tmp)
        # Keras loads files: checkpoints in object storage are downloaded first.
        copies = local_copies(ordered if metric is not None else shown, scratch / "inputs")
        members = copies[-count:]
        if model is None and is_weights_only(members[-1]):
            raise CheckpointError(
                shown[-1],
                "is a weights-only file and holds no architecture; pass --model FILE.keras "
                "with the model it was saved from",
            )
        # combine's checks (self-contained files, the same tensors in each) run before Keras
        # reads anything: a file that cannot be averaged fails here with combine's message.
        check = scratch / f"check{suffix_of(members[-1])}"
        wavg_combine(members, check, order="given", dry_run=True)
        net = compiled_model_for(members, dataset, model, custom_objects, trust)
        scorer = Scorer(net, dataset.x_test, dataset.y_test)
        prepare = None
        if bn_data is not None:
            prepare, _ = bn_preparer(net, members[-1], bn_data, batch_size)
        twins = list(columns) if bn_data is not None else []
        best = list(columns) if metric is not None else []
        per_row = 1 + len(columns) + len(twins) + len(best) + (held_out is not None)
        steps = _Steps(progress, count * per_row)
        predictions, vectors = [], []
        for path in members:
            predictions.append(scorer.predict_file(path))
            vectors.append(scorer.weight_vector())
            steps.advance()
        names = [SINGLE, *(c.name for c in columns), *(f"{c.name}{BN_SUFFIX}" for c in twins)]
        names += [f"{BEST_PREFIX}{c.name}" for c in best]
        names += [GREEDY] if held_out is not None else []
        names += [ENSEMBLE] if ensemble else []
        soups = _GreedySoups(net, members, held_out, scorer, scratch) if held_out else None
        scores: list[dict[str, dict[str, float]]] = [{} for _ in range(count)]
        for n in range(1, count + 1):
            row = scores[n - 1]
            row[SINGLE] = scorer.score(predictions[-n])
            for column in columns:
                averaged = _average(members[-n:], column, scratch, n)
                row[column.name] = scorer.score(scorer.predict_file(averaged))
                steps.advance()
                if column in twins:
                    row[f"{column.name}{BN_SUFFIX}"] = _bn_scores(
                        scorer, prepare, averaged, scratch
                    )
                    steps.advance()
                averaged.unlink()
            if best:
                assert metric is not None and pool.values is not None
                chosen = [copies[i] for i in best_positions(pool.values, n, metric)]
                for column in best:
                    averaged = _average(chosen, column, scratch, n, "best-")
                    row[f"{BEST_PREFIX}{column.name}"] = scorer.score(scorer.predict_file(averaged))
                    steps.advance()
                    averaged.unlink()
            if soups is not None:
                row[GREEDY] = soups.scores(n)
                steps.advance()
            if ensemble:
                row[ENSEMBLE] = scorer.score(np.mean(predictions[-n:], axis=0))
    return EvaluationResult(
        checkpoints=shown,
        epochs=pool.epochs[-count:],
        data=dataset.name,
        metrics=scorer.metric_names,
        columns=names,
        scores=scores,
        warnings=one_run_warnings(vectors, shown),
        best_by=metric.name if metric is not None else None,
    )


def _held_out(
    data: str | os.PathLike[str] | Dataset | None,
    soup_data: str | os.PathLike[str] | Dataset | None,
) -> Dataset | None:
    """The data the greedy column chooses on: `soup_data`, or the blobs validation split when
    the table reports on the built-in data; never the data the table reports on."""
    if soup_data is None:
        if data is None:
            return load_validation(BLOBS)
        builtin = not isinstance(data, Dataset) and os.fspath(data) in BUILT_IN
        return load_validation(data) if builtin else None
    if isinstance(soup_data, Dataset):
        return soup_data
    if not isinstance(data, Dataset) and same_data_file(data, soup_data):
        raise UsageError(
            f"--soup-data {soup_data} is also --data: the soup must be chosen on held-out "
            "data, not on the data the table reports on; give a separate file"
        )
    return load_validation(soup_data)


def _bn_scores(
    scorer: Scorer, prepare: Prepare | None, averaged: Path, scratch: Path
) -> dict[str, float]:
    """The scores of `averaged` after recalibration (as they are when there is no BN)."""
    if prepare is None:
        return scorer.score(scorer.predict_file(averaged))
    ready = prepare(averaged, scratch)
    try:
        return scorer.score(scorer.predict_file(ready))
    finally:
        ready.unlink()


class _GreedySoups:
    """The greedy soup of the n newest members, chosen on held-out data, scored on the test
    split; averages shared between rows are made and scored once."""

    def __init__(
        self, net: object, members: list[Path], held_out: Dataset, test: Scorer, scratch: Path
    ) -> None:
        validation = Scorer(net, held_out.x_test, held_out.y_test)
        self.metric = validation.primary_metric
        self.higher = higher_is_better(self.metric)
        self.choose = SubsetScores(members, validation, self.metric, scratch)
        self.report = SubsetScores(members, test, self.metric, scratch)
        self.count = len(members)

    def scores(self, n: int) -> dict[str, float]:
        newest = range(self.count - n, self.count)
        singles = [self.choose.score(frozenset([i])) for i in newest]
        ranked = [newest[i] for i in rank(singles, self.higher)]
        kept, _ = greedy_soup(ranked, self.choose.score, self.higher)
        return self.report.scores(frozenset(kept))


class _Steps:
    def __init__(self, report: Progress | None, total: int) -> None:
        self.report, self.total, self.done = report, total, 0

    def advance(self) -> None:
        self.done += 1
        if self.report is not None:
            self.report(self.done, self.total)


def _average(members: Sequence[Path], column: Average, tmp: Path, n: int, prefix: str = "") -> Path:
    out = tmp / f"{prefix}{column.scheme}-{column.alpha:g}-{n}{suffix_of(members[-1])}"
    wavg_combine(members, out, scheme=column.scheme, alpha=column.alpha, order="given")
    return out
