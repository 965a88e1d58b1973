"""Averaging many small tensors as one unit: exact on real Keras files, whatever the cut.

combine batches runs of small tensors of one dtype (one vectored read per input per run,
one sum per batch). These tests cut the same Keras checkpoints into units of different
sizes, mix float16, bfloat16, float32 and float64 layers (a batch ends where the dtype
changes), add a scalar weight and an empty one, and turn some tensors into chunked,
compressed datasets (read through h5py, not raw) between raw ones; every averaged value
must still be the correctly rounded weighted mean.
"""

from __future__ import annotations

import shutil

import h5py
import ml_dtypes
import numpy as np
import pytest
from support.keras_runs import FORMATS
from support.reference import assert_exact_average, h5_tensors

import wavg
from wavg.averaging.schemes import raw_weights

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, keras_module):
    """Three checkpoints of a model of ~70 small tensors in four float dtypes, with a scalar
    and an empty weight, saved by Keras in every format; files per format, oldest first."""
    keras = keras_module

    @keras.saving.register_keras_serializable(package="wavg_batched_tests")
    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(shape=(), initializer="ones", name="scale")
            self.empty = self.add_weight(shape=(0,), initializer="zeros", name="empty")

        def call(self, x):
            return x * self.scale

    layers = [keras.Input((6,))]
    for i in range(16):
        dtype = ("float32", "float16", "bfloat16", "float64")[i % 4] if i % 3 else "float32"
        layers += [keras.layers.Dense(6, dtype=dtype), keras.layers.BatchNormalization()]
    layers += [Scale(), keras.layers.Dense(3)]
    model = keras.Sequential(layers)
    directory = tmp_path_factory.mktemp("batched")
    rng = np.random.default_rng(3)
    start = [rng.standard_normal(w.shape).astype(w.dtype) for w in model.get_weights()]
    files: dict[str, list] = {}
    for epoch in range(3):
        # One run's epochs: small steps from a common start.
        model.set_weights(
            [(w + 0.01 * epoch * rng.standard_normal(w.shape)).astype(w.dtype) for w in start]
        )
        for fmt in FORMATS:
            path = directory / f"m_{epoch}.{fmt}"
            model.save_weights(path) if fmt == "weights.h5" else model.save(path)
            files.setdefault(fmt, []).append(path)
    return files


def numeric(value: np.ndarray) -> np.ndarray:
    """Keras stores bfloat16 as opaque 2-byte data."""
    return value.view(BF16) if value.dtype.kind == "V" and value.dtype.itemsize == 2 else value


def is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == BF16


def assert_every_tensor_is_the_average(out, inputs, weights) -> int:
    """Every float model tensor of `out` is the exact weighted mean; returns how many."""
    members = [h5_tensors(p) for p in inputs]
    averaged = h5_tensors(out)
    checked = 0
    for name, value in averaged.items():
        value = numeric(value)
        if "optimizer" in name or not is_float(value.dtype) or value.size == 0:
            continue
        assert_exact_average(value, [numeric(m[name]) for m in members], weights)
        checked += 1
    return checked


@pytest.mark.parametrize("block_items", [5, 64, 1 << 20])
@pytest.mark.parametrize("fmt", FORMATS)
def test_small_tensors_of_mixed_dtypes_average_exactly_however_they_are_batched(
    mixed_run, tmp_path, fmt, block_items
):
    files = mixed_run[fmt]
    out = tmp_path / f"avg.{fmt}"
    summary = wavg.run_plan(wavg.plan_combine(files, scheme="linear"), out, block_items=block_items)
    checked = assert_every_tensor_is_the_average(out, files, raw_weights(3, "linear"))
    assert checked == summary.tensors - 1  # all but the empty one
    dtypes = {numeric(v).dtype for v in h5_tensors(out).values() if is_float(numeric(v).dtype)}
    assert {np.dtype("float16"), BF16, np.dtype("float32"), np.dtype("float64")} <= dtypes
    assert any(v.shape == () and v.dtype.kind == "f" for v in h5_tensors(out).values())


def _compress_every_third_tensor(path) -> int:
    """Rewrite every third non-scalar model tensor as a chunked, gzip-compressed dataset."""
    names: list[str] = []
    with h5py.File(path, "r+") as f:
        f.visititems(
            lambda n, o: (
                names.append(n)
                if isinstance(o, h5py.Dataset) and o.ndim and o.size and "optimizer" not in n
                else None
            )
        )
        chosen = names[::3]
        for name in chosen:
            data, attrs = f[name][()], dict(f[name].attrs)
            del f[name]
            f.create_dataset(name, data=data, chunks=True, compression="gzip")
            f[name].attrs.update(attrs)
    return len(chosen)


@pytest.mark.parametrize("fmt", ["h5", "weights.h5"])
def test_compressed_tensors_between_raw_ones_average_exactly(mixed_run, tmp_path, fmt):
    files = []
    for source in mixed_run[fmt]:
        files.append(tmp_path / source.name)
        shutil.copy(source, files[-1])
        assert _compress_every_third_tensor(files[-1]) > 5
    out = tmp_path / f"avg.{fmt}"
    wavg.run_plan(wavg.plan_combine(files), out, block_items=64)
    assert assert_every_tensor_is_the_average(out, files, raw_weights(3, "equal")) > 30


def test_identical_copies_of_many_small_tensors_give_identical_bytes(mixed_run, tmp_path):
    newest = mixed_run["keras"][-1]
    copies = [tmp_path / f"copy_{i}.keras" for i in range(3)]
    for copy in copies:
        shutil.copy(newest, copy)
    out = tmp_path / "avg.keras"
    wavg.combine(copies, out)
    assert h5_tensors(out).keys() == h5_tensors(newest).keys()
    for name, value in h5_tensors(newest).items():
        assert h5_tensors(out)[name].tobytes() == value.tobytes(), name
