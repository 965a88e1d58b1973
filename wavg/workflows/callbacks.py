"""The Keras callbacks behind `wavg.keras` and ``wavg train-save``: keep the last K epochs,
report progress.

Imports Keras at import time; only `wavg.keras` (which checks first that Keras is installed)
and `wavg.workflows.train` import this module.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from pathlib import Path

import keras

from wavg.workflows.model_loading import keras_logs_quiet

FORMATS = {"h5": ".h5", "keras": ".keras", "weights.h5": ".weights.h5"}


def checkpoint_name(epoch: int, fmt: str = "h5", prefix: str = "model_") -> str:
    """The file name of one epoch's checkpoint, e.g. ``model_499.h5``; epochs count from 0."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return f"{prefix}{epoch}{FORMATS[fmt]}"


class KeepLastEpochs(keras.callbacks.Callback):
    """Save the model after each of the last `keep` epochs, named by epoch (0-based).

    With `total_epochs` known, only epochs ``total_epochs - keep ... total_epochs - 1`` are
    written (500 epochs, keep 10: ``model_490`` ... ``model_499``). Without it (training may
    stop early), every epoch is written and the oldest file this callback wrote is deleted
    once more than `keep` exist, so the directory always holds the K newest epochs. Files the
    callback did not write are never touched.

    `fmt` is ``"h5"`` (legacy HDF5 from ``model.save``, what the case study uses),
    ``"keras"`` (the native zip format) or ``"weights.h5"`` (weights only). Epoch numbers are
    the ones Keras passes, so ``fit(initial_epoch=...)`` continues the numbering.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep: int = 10,
        total_epochs: int | None = None,
        fmt: str = "h5",
        prefix: str = "model_",
    ) -> None:
        super().__init__()
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        checkpoint_name(0, fmt, prefix)  # validates fmt
        self.directory = Path(directory)
        self.keep = keep
        self.total_epochs = total_epochs
        self.fmt = fmt
        self.prefix = prefix
        self.written: deque[Path] = deque()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.written.clear()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.total_epochs is not None and epoch < self.total_epochs - self.keep:
            return
        path = self.directory / checkpoint_name(epoch, self.fmt, self.prefix)
        with keras_logs_quiet():
            if self.fmt == "weights.h5":
                self.model.save_weights(path)
            else:
                self.model.save(path)
        if path in self.written:
            self.written.remove(path)
        self.written.append(path)
        while len(self.written) > self.keep:
            self.written.popleft().unlink(missing_ok=True)


class ReportEpochs(keras.callbacks.Callback):
    """Call ``report(done, total, logs)`` after every epoch: a hook for progress bars."""

    def __init__(self, report: Callable[[int, int, dict[str, float]], None], total: int) -> None:
        super().__init__()
        self.report = report
        self.total = total

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.report(epoch + 1, self.total, {k: float(v) for k, v in (logs or {}).items()})
