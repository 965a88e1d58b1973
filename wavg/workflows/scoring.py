"""Score checkpoints with the model's own compiled loss and metrics, one architecture reused.

`evaluate` and `soup` both load a model once (through `wavg.workflows.model_loading`), then load each
checkpoint's weights into it and predict. This module scores; it never averages or writes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wavg.errors import CheckpointError, UsageError
from wavg.workflows.data import Dataset, check_fits_model

_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "r2")


def higher_is_better(metric: str) -> bool:
    """Accuracy-like metrics are maximised; losses and errors (mae, mse, ...) minimised."""
    return any(word in metric.lower() for word in _HIGHER_IS_BETTER)


def suffix_of(path: Path) -> str:
    """The checkpoint suffix Keras decides the format by (``.weights.h5`` before ``.h5``)."""
    name = path.name.lower()
    for suffix in (".weights.h5", ".keras", ".hdf5", ".h5"):
        if name.endswith(suffix):
            return suffix
    return path.suffix


class Scorer:
    """One compiled model, reused: load weights from a file, predict, score predictions.

    `x`, `y` are the arrays it scores on (a data set's test split, or a validation set).
    """

    def __init__(self, net: Any, x: np.ndarray, y: np.ndarray) -> None:
        self.net = net
        self.x, self.y = x, y
        self.metric_names = list(self.score(self.predict()).keys())

    @property
    def primary_metric(self) -> str:
        """The first compiled metric, else the loss."""
        return primary_metric(self.metric_names)

    def predict_file(self, path: Path) -> np.ndarray:
        from wavg.workflows.model_loading import load_weights

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


def compiled_model_for(
    members: Sequence[Path],
    dataset: Dataset,
    model: str | os.PathLike[str] | None,
    custom_objects: str | None,
    trust: bool,
) -> Any:
    """Check every member's config, load the architecture once and check the data fits it."""
    from wavg.workflows.model_loading import (
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
    if model is None and is_weights_only(source):
        raise CheckpointError(
            source,
            "is a weights-only file and holds no architecture; pass --model FILE.keras "
            "with the model it was saved from",
        )
    net = load_model(source, trust=trust, custom_objects=custom_objects)
    if not getattr(net, "compiled", False) or getattr(net, "loss", None) is None:
        raise CheckpointError(
            source,
            "the model was saved without a compiled loss; wavg scores with the model's "
            "own loss and metrics, so save it after compile()",
        )
    check_fits_model(dataset, net.input_shape, net.output_shape)
    return net


def primary_metric(names: list[str]) -> str:
    """The score tables, plots and soups use by default: the first compiled metric, else
    the loss."""
    others = [m for m in names if m != "loss"]
    return others[0] if others else "loss"


def check_metric(metric: str | None, names: list[str]) -> str:
    """`metric` if the model reports it (None: the primary one), else a usage error."""
    if metric is None:
        return primary_metric(names)
    if metric not in names:
        raise UsageError(f"--metric: the model reports {', '.join(names)}, not {metric!r}")
    return metric
