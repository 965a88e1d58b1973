"""A tiny Keras run that logs its metrics the three ways Keras does: a `CSVLogger` CSV, the
`History` of `fit` saved as JSON, and `ModelCheckpoint` file names with the values in them.

The model is a few KB, so one run (a couple of seconds) serves a whole test module.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EPOCHS = 8
# ModelCheckpoint name templates, one folder each (``{epoch}`` counts from 1).
TEMPLATES = {
    "unlabelled": "model.{epoch:02d}-{val_loss:.4f}.h5",
    "labelled": "model.{epoch:02d}-val_loss={val_loss:.4f}-val_accuracy={val_accuracy:.4f}.h5",
    "plain": "model.{epoch:02d}.h5",
    "ambiguous": "model.{epoch:02d}-{val_loss:.3f}-{val_accuracy:.3f}.h5",
    "keras": "model.{epoch:02d}-{val_loss:.4f}.keras",
}


@dataclass
class LoggedRun:
    """The files of one run: a checkpoint folder per template, the CSV and the History JSON."""

    folders: dict[str, Path]
    csv: Path
    history: Path

    def files(self, template: str) -> list[Path]:
        """The checkpoints saved with `template`, oldest first."""
        return sorted(self.folders[template].iterdir())

    def rows(self) -> dict[int, dict[str, float]]:
        """The CSV's rows as logged, keyed by its 0-based epoch column."""
        with self.csv.open(newline="") as handle:
            return {
                int(r.pop("epoch")): {k: float(v) for k, v in r.items()}
                for r in csv.DictReader(handle)
            }


def logged_run(directory: Path) -> LoggedRun:
    """Train a small classifier for `EPOCHS` epochs, saving every epoch with each template."""
    import keras

    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(96, 2)).astype("float32")
    y = keras.utils.to_categorical((x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5), 3)
    net = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(6, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    net.compile(
        optimizer=keras.optimizers.SGD(1.5), loss="categorical_crossentropy", metrics=["accuracy"]
    )
    folders = {name: directory / name for name in TEMPLATES}
    callbacks = [keras.callbacks.CSVLogger(str(directory / "log.csv"))]
    for name, template in TEMPLATES.items():
        folders[name].mkdir()
        callbacks.append(keras.callbacks.ModelCheckpoint(str(folders[name] / template)))
    history = net.fit(
        x, y, validation_split=0.25, epochs=EPOCHS, batch_size=8, verbose=0, callbacks=callbacks
    )
    history_path = directory / "history.json"
    history_path.write_text(
        json.dumps({k: [float(v) for v in vs] for k, vs in history.history.items()})
    )
    return LoggedRun(folders, directory / "log.csv", history_path)
