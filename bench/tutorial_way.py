"""Baseline: the well-known Keras tutorial's weight averaging, re-implemented faithfully.

The tutorial ("How to Create an Equally, Linearly, and Exponentially Weighted Average of
Neural Network Model Weights in Keras") loads every checkpoint as a full model, then for
each weight index calls ``model.get_weights()`` on every model (a full copy of the model per
call, kept as in the original), stacks that weight across models, ``numpy.average``s it with
the scheme's weights, and finally ``clone_model`` + ``set_weights`` + ``compile`` a new
model. Saving the result (``model.save``) is what a user does next, so it is timed too.

Usage: ``python bench/tutorial_way.py [--scheme equal|exp] [--alpha A] -o OUT IN...``
(inputs oldest first; like the tutorial, the exponential scheme gives the newest the most).
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from numpy import array, average  # noqa: E402


def load_all_models(filenames: list[str]) -> list:
    """As in the tutorial: one full Keras model per checkpoint, all held at once."""
    return [keras.models.load_model(name) for name in filenames]


def model_weight_ensemble(members: list, weights: list[float]):  # noqa: ANN201 (keras type)
    """The tutorial's function, line for line (with its compile arguments)."""
    n_layers = len(members[0].get_weights())
    avg_model_weights = []
    for layer in range(n_layers):
        layer_weights = array([model.get_weights()[layer] for model in members])
        avg_layer_weights = average(layer_weights, axis=0, weights=weights)
        avg_model_weights.append(avg_layer_weights)
    model = keras.models.clone_model(members[0])
    model.set_weights(avg_model_weights)
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def scheme(n: int, name: str, alpha: float) -> list[float]:
    """Tutorial weights for `n` members in file order (oldest first), not normalised:
    numpy.average normalises them itself."""
    if name == "equal":
        return [1.0 / n] * n
    return [math.exp(-(n - i) / alpha) for i in range(1, n + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--scheme", choices=("equal", "exp"), default="equal")
    parser.add_argument("--alpha", type=float, default=2.0)
    args = parser.parse_args()
    members = load_all_models(args.inputs)
    model = model_weight_ensemble(members, scheme(len(members), args.scheme, args.alpha))
    model.save(args.output)


if __name__ == "__main__":
    main()
