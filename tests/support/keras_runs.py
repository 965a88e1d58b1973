"""Short Keras training runs saved in every format: the model families the fixtures train.

Each family is trained for a few steps between saves, so its checkpoints differ the way one
run's last epochs do; the weights Keras reports after each save are kept as the reference.
Builders take the keras module as an argument: importing this module never imports Keras.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMATS = ("h5", "keras", "weights.h5")
# Checkpoints of several files: sharded weights (``.weights.json`` and its shards) and an
# unzipped ``.keras`` folder (``model.save(dir, zipped=False)``).
MULTI_FILE = ("weights.json", "folder")
SHARD_GB = 2e-6  # Keras' max_shard_size: ~2 kB shards (the largest tensor is 1.7 kB), a few each


@dataclass
class Run:
    """Checkpoints of one short training run: files per format, oldest first."""

    name: str
    model: object  # the live keras model (architecture for load_weights)
    files: dict[str, list[Path]] = field(default_factory=dict)
    weights: list[list[np.ndarray]] = field(default_factory=list)  # per checkpoint
    x: np.ndarray | None = None


def _mlp(keras):
    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(25, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def _conv_bn(keras):
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.2),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def _lstm(keras):
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(20, 4),
            keras.layers.LSTM(6),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def _subclassed(keras):
    @keras.saving.register_keras_serializable(package="wavg_tests")
    class TwoTower(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.left = keras.layers.Dense(6, activation="tanh")
            self.right = keras.layers.Dense(6, activation="relu")
            self.head = keras.layers.Dense(3, activation="softmax")

        def call(self, x):
            return self.head(self.left(x) + self.right(x))

    model = TwoTower()
    model(np.zeros((1, 2), dtype="float32"))
    return model


def inputs_for(name: str, rng: np.random.Generator) -> np.ndarray:
    """A batch of inputs that fits the model family `name`."""
    if name == "conv_bn":
        return rng.random((16, 8, 8, 1), dtype=np.float32)
    if name == "lstm":
        return rng.integers(0, 20, size=(16, 5)).astype("int32")
    return rng.random((16, 2), dtype=np.float32)


BUILDERS = {"mlp": _mlp, "conv_bn": _conv_bn, "lstm": _lstm, "subclassed": _subclassed}


def train_run(keras, name: str, directory: Path, rng, formats: tuple[str, ...]) -> Run:
    """Train the family `name` for two epochs between saves, three times; save each in `formats`."""
    model = BUILDERS[name](keras)
    # Named: Keras numbers unnamed optimizers per process ("adam_1", ...), and the tests
    # look for this one's state by name whatever ran before them.
    model.compile(optimizer=keras.optimizers.Adam(name="adam"), loss="categorical_crossentropy")
    x = inputs_for(name, rng)
    y = keras.utils.to_categorical(rng.integers(0, 3, len(x)), 3)
    run = Run(name, model, x=x)
    for epoch in range(3):
        model.fit(x, y, epochs=2, batch_size=4, verbose=0)
        save_checkpoint(run, directory / f"{name}_{epoch}", formats)
    return run


def save_checkpoint(run: Run, stem: Path, formats: tuple[str, ...]) -> None:
    """Save `run.model` as `stem.<fmt>` in each format (a folder is `stem` itself) and record
    its weights."""
    for fmt in formats:
        path = stem if fmt == "folder" else stem.with_name(f"{stem.name}.{fmt}")
        if fmt == "weights.h5":
            run.model.save_weights(path)
        elif fmt == "weights.json":
            run.model.save_weights(path, max_shard_size=SHARD_GB)
        elif fmt == "folder":
            run.model.save(path, zipped=False)
        else:
            run.model.save(path)
        run.files.setdefault(fmt, []).append(path)
    run.weights.append([np.array(w) for w in run.model.get_weights()])
