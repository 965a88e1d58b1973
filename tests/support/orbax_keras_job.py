"""Keras side of the Orbax tests, run in a subprocess because the backend is fixed at import.

``train DIR``: train small models with ``keras.callbacks.OrbaxCheckpoint`` for 4 epochs into
``DIR/<kind>`` (every step kept), and one with the callback's default ``max_to_keep`` into
``DIR/<kind>-default``. ``load OUT KIND NPZ``: build KIND afresh, ``load_weights(OUT)`` and
save every trainable and non-trainable variable, by its Orbax name, into NPZ.
"""

from __future__ import annotations

import os
import sys

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import keras  # noqa: E402

KINDS = {"jax": ("functional", "sequential", "bf16"), "tensorflow": ("functional", "sequential")}


def build(kind: str) -> keras.Model:
    """The model of `kind`, named: Keras names the variables' paths after the model and
    skips (silently) what does not match, so a loader must rebuild the very same names."""
    if kind == "functional":
        inputs = keras.Input((4,))
        x = keras.layers.Dense(8, activation="relu", name="d1")(inputs)
        x = keras.layers.BatchNormalization(name="bn")(x)
        outputs = keras.layers.Dense(3, activation="softmax", name="d2")(x)
        model = keras.Model(inputs, outputs, name="func")
    elif kind == "sequential":
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="relu", name="d1"),
                keras.layers.BatchNormalization(name="bn"),
                keras.layers.Dense(3, activation="softmax", name="d2"),
            ],
            name="seq",
        )
    else:  # bfloat16 weights
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="relu", name="d1", dtype="bfloat16"),
                keras.layers.Dense(3, activation="softmax", name="d2", dtype="bfloat16"),
            ],
            name="bf16",
        )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def train(directory: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((64, 4), dtype=np.float32)
    y = rng.integers(0, 3, 64)
    runs = [(kind, None) for kind in KINDS[keras.backend.backend()]] + [("functional", 1)]
    for kind, keep in runs:
        keras.utils.set_random_seed(1)
        model = build(kind)
        name = kind if keep is None else f"{kind}-default"
        callback = (
            keras.callbacks.OrbaxCheckpoint(os.path.join(directory, name), max_to_keep=None)
            if keep is None
            else keras.callbacks.OrbaxCheckpoint(os.path.join(directory, name))
        )
        model.fit(x, y, epochs=4, batch_size=16, callbacks=[callback], verbose=0)


def load(out: str, kind: str, npz: str) -> None:
    model = build(kind)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(out)
    state = model.get_state_tree()
    values = {}
    for group in ("trainable_variables", "non_trainable_variables"):
        stack = [((group,), state[group])]
        while stack:
            path, node = stack.pop()
            if isinstance(node, dict):
                stack.extend(((*path, k), v) for k, v in node.items())
            else:
                values[".".join(path)] = np.asarray(
                    keras.ops.convert_to_numpy(keras.ops.cast(node, "float32"))
                )
    np.savez(npz, **values)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2])
    else:
        for job in sys.argv[2:]:
            load(*job.split(","))
