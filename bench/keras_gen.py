"""Write random-weight Keras checkpoints of one model, in one or more save formats.

Run as a subprocess by the harness (``checkpoints.py``) so that the harness itself never
imports TensorFlow: importing it costs seconds and hundreds of MB that would blur the
measurements the harness takes of its other children.

Usage: ``python bench/keras_gen.py JOBS_JSON``: a JSON list of jobs (one TensorFlow start-up
for all of them), each an object with ``input_dim``,
``units`` (one Dense layer per entry), ``batchnorm`` (a BatchNormalization after each Dense),
or ``application`` (a ``keras.applications`` name, built with ``weights=None``),
``formats`` (any of ``h5``, ``keras``, ``weights``), ``start``, ``stop`` (checkpoint indices,
so a set can be extended without rewriting what exists), ``seed`` and ``dir``.
Checkpoint i uses seed ``seed + i``: the same spec always gives the same bytes of weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
from workloads import checkpoint_name  # noqa: E402


def build_model(input_dim: int, units: list[int], batchnorm: bool):  # noqa: ANN201 (keras type)
    """An MLP: one Dense per entry of `units`, each optionally followed by BatchNormalization."""
    import keras

    layers: list = [keras.Input(shape=(input_dim,))]
    for width in units:
        layers.append(keras.layers.Dense(width, activation="relu"))
        if batchnorm:
            layers.append(keras.layers.BatchNormalization())
    return keras.Sequential(layers)


def build_application(name: str):  # noqa: ANN201 (keras type)
    """A ``keras.applications`` model with random initial weights (``weights=None``: no
    download)."""
    import keras

    return getattr(keras.applications, name)(weights=None)


def random_weights(model, seed: int) -> list[np.ndarray]:  # noqa: ANN001 (keras type)
    """Uniform [0, 1) float32 values: positive, so BatchNormalization variances stay valid."""
    rng = np.random.default_rng(seed)
    return [rng.random(tuple(w.shape), dtype=np.float32) for w in model.weights]


def save(model, path: Path, fmt: str) -> None:  # noqa: ANN001 (keras type)
    """Save in the way a user's training script would for that format."""
    if fmt == "weights":
        model.save_weights(path)
    else:
        model.save(path)


def write_job(spec: dict) -> None:
    """Write checkpoints ``start..stop-1`` of the spec, in every requested format.

    Each file is saved under a temporary name and renamed, so a file that exists is complete
    and an interrupted run can be resumed by asking for the missing indices only.
    """
    out = Path(spec["dir"])
    out.mkdir(parents=True, exist_ok=True)
    if spec.get("application"):
        model = build_application(spec["application"])
    else:
        model = build_model(spec["input_dim"], spec["units"], spec.get("batchnorm", False))
    for index in range(spec["start"], spec["stop"]):
        model.set_weights(random_weights(model, spec["seed"] + index))
        for fmt in spec["formats"]:
            final = out / checkpoint_name(index, fmt)
            partial = final.with_name("partial_" + final.name)
            save(model, partial, fmt)
            os.replace(partial, final)


if __name__ == "__main__":
    for job in json.loads(sys.argv[1]):
        write_job(job)
