"""`wavg evaluate`: does averaging the last checkpoints beat the checkpoints themselves?

For n = 1 ... N it scores, on the test split, with the model's own compiled loss and metrics:

- ``single``: the n-th newest checkpoint alone (n = 1 is the last epoch);
- one column per weighting (``equal``, ``linear``, ``exp``, and ``exp(a=...)`` for each extra
  decay rate): the weight average of the n newest, made by `wavg.combine` into a temporary
  directory and loaded back, exactly as a user would;
- ``ensemble``: the mean of the n newest checkpoints' predictions (output averaging, which
  needs all n models at prediction time).

Each checkpoint is loaded once and its predictions cached; averages are loaded as weights into
one model built from the newest checkpoint (or ``--model``), so a run over N files loads the
architecture once and N + N * schemes weight files.

"One run?" check. Averaging weights only makes sense for checkpoints of one training run:
independently trained models have unaligned weights, and their average is usually far worse
than either. With w_i the flattened weights (oldest to newest), the result carries a warning
when (a) the members' spread ``max_i |w_i - mean(w)|`` exceeds 25% of their typical size
``mean_i |w_i|`` (consecutive epochs of one run differ by about a percent), or (b) with three or
more members, one step ``|w_(k+1) - w_k|`` is more than 10 times the median step (a file from
another run, or a gap of many epochs, in the middle of the list).
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

from wavg.combine import combine as wavg_combine
from wavg.data import Dataset, check_fits_model, load_data
from wavg.errors import CheckpointError, UsageError
from wavg.onerun import JUMP_LIMIT, SPREAD_LIMIT, not_one_run
from wavg.ordering import epoch_numbers, order_checkpoints
from wavg.schemes import DEFAULT_ALPHA, SCHEMES

SCHEMA = "wavg.evaluate/1"
SINGLE, ENSEMBLE = "single", "ensemble"
_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "r2")

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

    @property
    def primary_metric(self) -> str:
        """The score tables and plots show: the first compiled metric, else the loss."""
        others = [m for m in self.metrics if m != "loss"]
        return others[0] if others else "loss"

    def check_metric(self, metric: str | None) -> str:
        """`metric` if the model reports it (None: the primary metric), else a usage error."""
        if metric is None:
            return self.primary_metric
        if metric not in self.metrics:
            raise UsageError(
                f"--metric: the model reports {', '.join(self.metrics)}, not {metric!r}"
            )
        return metric

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


def higher_is_better(metric: str) -> bool:
    """Accuracy-like metrics are maximised; losses and errors (mae, mse, ...) minimised."""
    return any(word in metric.lower() for word in _HIGHER_IS_BETTER)


def averages_for(
    schemes: Sequence[str] = SCHEMES,
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
    schemes: Sequence[str] = SCHEMES,
    alpha: float = DEFAULT_ALPHA,
    alphas: Sequence[float] | None = None,
    max_n: int | None = None,
    *,
    ensemble: bool = True,
    model: str | os.PathLike[str] | None = None,
    custom_objects: str | None = None,
    trust: bool = False,
    order: str = "natural",
    progress: Progress | None = None,
) -> EvaluationResult:
    """Score single checkpoints, weight averages and the output ensemble for n = 1 ... N.

    `paths` are ordered as `wavg.combine` orders them (by the epoch in the name, newest last);
    N is `max_n` or the number of files. `data` is ``"blobs"`` (default), an ``.npz`` path or a
    `Dataset`. Weights-only files need `model` (a ``.keras`` model) for the architecture.
    `progress(done, total)` is called as the work advances.
    """
    from wavg.model_loading import is_weights_only

    ordered = order_checkpoints(paths, order=order)
    count = max_n if max_n is not None else len(ordered)
    if not 1 <= count <= len(ordered):
        raise UsageError(f"--max-n must be between 1 and {len(ordered)} (the files given)")
    members = ordered[-count:]
    columns = averages_for(schemes, alpha, alphas)
    if model is None and is_weights_only(members[-1]):
        raise CheckpointError(
            members[-1],
            "is a weights-only file and holds no architecture; pass --model FILE.keras "
            "with the model it was saved from",
        )
    dataset = data if isinstance(data, Dataset) else load_data(data)
    with tempfile.TemporaryDirectory(prefix="wavg-evaluate-") as tmp:
        # combine's checks (self-contained files, the same tensors in each) run before Keras
        # reads anything: a file that cannot be averaged fails here with combine's message.
        check = Path(tmp) / f"check{_suffix(members[-1])}"
        wavg_combine(members, check, order="given", dry_run=True)
        scorer = _scorer_for(members, dataset, model, custom_objects, trust)
        steps = _Steps(progress, count * (1 + len(columns)))
        predictions, vectors = [], []
        for path in members:
            predictions.append(scorer.predict_file(path))
            vectors.append(scorer.weight_vector())
            steps.advance()
        names = [SINGLE, *(c.name for c in columns)] + ([ENSEMBLE] if ensemble else [])
        scores: list[dict[str, dict[str, float]]] = [{} for _ in range(count)]
        for n in range(1, count + 1):
            scores[n - 1][SINGLE] = scorer.score(predictions[-n])
            for column in columns:
                averaged = _average(members[-n:], column, Path(tmp), n)
                scores[n - 1][column.name] = scorer.score(scorer.predict_file(averaged))
                averaged.unlink()
                steps.advance()
            if ensemble:
                scores[n - 1][ENSEMBLE] = scorer.score(np.mean(predictions[-n:], axis=0))
    return EvaluationResult(
        checkpoints=members,
        epochs=epoch_numbers(members),
        data=dataset.name,
        metrics=scorer.metric_names,
        columns=names,
        scores=scores,
        warnings=one_run_warnings(vectors, members),
    )


def one_run_warnings(vectors: Sequence[np.ndarray], paths: Sequence[Path]) -> list[str]:
    """Warnings when the checkpoints do not look like consecutive epochs of one run.

    See the module docstring for the two rules and their limits.
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


def _scorer_for(
    members: Sequence[Path],
    dataset: Dataset,
    model: str | os.PathLike[str] | None,
    custom_objects: str | None,
    trust: bool,
) -> _Scorer:
    """Check every member's config, load the architecture once and check the data fits it."""
    from wavg.model_loading import (
        allowed_names,
        check_config,
        custom_objects_from,
        import_keras,
        is_weights_only,
        load_model,
    )

    import_keras()
    allowed = allowed_names(custom_objects_from(custom_objects))
    for path in members:
        if not is_weights_only(path):
            check_config(path, trust=trust, allowed=allowed)
    source = model or members[-1]
    net = load_model(source, trust=trust, custom_objects=custom_objects)
    if not getattr(net, "compiled", False) or getattr(net, "loss", None) is None:
        raise CheckpointError(
            source,
            "the model was saved without a compiled loss; evaluate scores with the model's "
            "own loss and metrics, so save it after compile()",
        )
    check_fits_model(dataset, net.input_shape, net.output_shape)
    return _Scorer(net, dataset)


class _Scorer:
    """One compiled model, reused: load weights from a file, predict, score predictions."""

    def __init__(self, net: Any, dataset: Dataset) -> None:
        self.net = net
        self.x, self.y = dataset.x_test, dataset.y_test
        self.metric_names = list(self.score(self.predict()).keys())

    def predict_file(self, path: Path) -> np.ndarray:
        from wavg.model_loading import load_weights

        load_weights(self.net, path)
        return self.predict()

    def predict(self) -> np.ndarray:
        return np.asarray(self.net.predict(self.x, batch_size=1024, verbose=0))

    def weight_vector(self) -> np.ndarray:
        return np.concatenate([np.ravel(w).astype(np.float64) for w in self.net.get_weights()])

    def score(self, y_pred: np.ndarray) -> dict[str, float]:
        """The compiled loss and metrics of predictions, as ``model.evaluate`` reports them."""
        self.net.reset_metrics()
        loss = float(self.net.compute_loss(x=self.x, y=self.y, y_pred=y_pred, training=False))
        results = self.net.compute_metrics(self.x, self.y, y_pred, sample_weight=None)
        scores = {"loss": loss}
        scores.update({k: float(v) for k, v in results.items() if k != "loss"})
        return scores


class _Steps:
    def __init__(self, report: Progress | None, total: int) -> None:
        self.report, self.total, self.done = report, total, 0

    def advance(self) -> None:
        self.done += 1
        if self.report is not None:
            self.report(self.done, self.total)


def _average(members: Sequence[Path], column: Average, tmp: Path, n: int) -> Path:
    out = tmp / f"{column.scheme}-{column.alpha:g}-{n}{_suffix(members[-1])}"
    wavg_combine(members, out, scheme=column.scheme, alpha=column.alpha, order="given")
    return out


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".weights.h5", ".keras", ".hdf5", ".h5"):
        if name.endswith(suffix):
            return suffix
    return path.suffix
