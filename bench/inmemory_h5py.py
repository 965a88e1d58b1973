"""Baseline: the obvious h5py script that holds every tensor of every checkpoint in memory.

Reads all tensors of all inputs, ``numpy.average``s each across files (float64, as numpy
does for float32 input with weights), then writes the result by copying the newest file and
overwriting its datasets in place. No TensorFlow: this isolates what streaming buys over a
plain whole-model h5py approach. Works on ``.h5`` and ``.weights.h5`` (not ``.keras`` zips).

Usage: ``python bench/inmemory_h5py.py -o OUT IN...`` (inputs oldest first, equal weights).
"""

from __future__ import annotations

import argparse
import shutil

import h5py
import numpy as np
from h5tensors import tensor_names


def read_all(paths: list[str]) -> list[dict[str, np.ndarray]]:
    """Every tensor of every file, fully in memory."""
    models = []
    for path in paths:
        with h5py.File(path, "r") as handle:
            models.append({name: handle[name][()] for name in tensor_names(handle)})
    return models


def average_all(models: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """numpy.average of each tensor across models, cast back to the stored dtype."""
    weights = [1.0 / len(models)] * len(models)
    return {
        name: np.average(np.stack([m[name] for m in models]), axis=0, weights=weights).astype(
            models[-1][name].dtype
        )
        for name in models[-1]
    }


def write_like(template: str, output: str, tensors: dict[str, np.ndarray]) -> None:
    """Copy the newest checkpoint (keeping its layout and metadata), then overwrite its data."""
    shutil.copyfile(template, output)
    with h5py.File(output, "r+") as handle:
        for name, value in tensors.items():
            handle[name][...] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    write_like(args.inputs[-1], args.output, average_all(read_all(args.inputs)))


if __name__ == "__main__":
    main()
