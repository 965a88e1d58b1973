"""combine on real Keras checkpoints: every format, model family and dtype.

The output must equal numpy.average of the weights Keras reported (to the last bit, in the
tensor's dtype), load back in Keras, predict like a model given those weights, and carry
the newest input's architecture, config, non-float tensors and optimizer state.
"""

from __future__ import annotations

import json
import zipfile

import h5py
import ml_dtypes
import numpy as np
import pytest
from support.keras_runs import FORMATS
from support.reference import assert_exact_average, h5_tensors, reference_average

import wavg
from wavg.averaging.schemes import raw_weights

SCHEMES = [("equal", {}), ("linear", {}), ("exp", {"alpha": 0.7})]


def load(keras, run, fmt, path):
    if fmt == "weights.h5":
        model = (
            keras.models.clone_model(run.model) if run.name != "subclassed" else type(run.model)()
        )
        if run.name == "subclassed":
            model(np.zeros((1, 2), dtype="float32"))
        model.load_weights(path)
        return model
    return keras.models.load_model(path)


# Keras cannot save a subclassed model as legacy .h5, so that pair does not exist.
CASES = [(f, fmt) for f in ("mlp", "conv_bn", "lstm", "subclassed") for fmt in FORMATS]
CASES.remove(("subclassed", "h5"))


@pytest.mark.parametrize(("family", "fmt"), CASES)
def test_average_equals_numpy_average_and_loads_in_keras(runs, keras_module, tmp_path, family, fmt):
    run = runs[family]
    for scheme, options in SCHEMES:
        out = tmp_path / f"avg_{scheme}.{fmt}"
        summary = wavg.combine(run.files[fmt], out, scheme=scheme, **options)
        w = raw_weights(3, scheme, **options)
        expected = reference_average(run.weights, w)
        model = load(keras_module, run, fmt, out)
        got = [np.array(t) for t in model.get_weights()]
        assert len(got) == len(expected)
        for i, tensor in enumerate(got):
            assert_exact_average(tensor, [member[i] for member in run.weights], w)
        assert summary.format == ("keras" if fmt == "keras" else summary.format)
        reference = keras_module.models.clone_model(model) if family != "subclassed" else model
        if family != "subclassed":
            reference.set_weights(expected)
        np.testing.assert_allclose(
            model.predict(run.x, verbose=0), reference.predict(run.x, verbose=0), rtol=1e-5
        )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_float_dtype_is_averaged_exactly_and_written_back_in_its_dtype(
    dtype_runs, tmp_path, dtype, fmt
):
    run = dtype_runs[dtype]
    out = tmp_path / f"avg.{fmt}"
    wavg.combine(run.files[fmt], out, scheme="linear")
    w = raw_weights(3, "linear")
    newest, averaged = h5_tensors(run.files[fmt][-1]), h5_tensors(out)
    inputs = [h5_tensors(p) for p in run.files[fmt]]
    numeric = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    checked = 0
    for name, value in averaged.items():
        if "optimizer" in name or value.dtype != newest[name].dtype or value.ndim == 0:
            continue
        assert value.dtype == newest[name].dtype  # stored type unchanged (opaque for bfloat16)
        members = [np.asarray(t[name]).view(numeric) for t in inputs]
        assert_exact_average(value.view(numeric), members, w)
        checked += 1
    assert checked == 4


def test_non_float_tensors_and_optimizer_state_come_from_the_newest(runs, tmp_path):
    files = runs["mlp"].files["h5"]
    out = tmp_path / "avg.h5"
    wavg.combine(files, out)
    newest, averaged = h5_tensors(files[-1]), h5_tensors(out)
    optimizer = [n for n in newest if n.startswith("optimizer_weights/")]
    assert optimizer, "the fixture must carry optimizer state"
    for name in optimizer:
        assert np.array_equal(averaged[name], newest[name]), name
    assert averaged["optimizer_weights/adam/iteration"].dtype.kind == "i"


def test_output_carries_the_newest_config_and_metadata(runs, tmp_path):
    files = runs["conv_bn"].files
    out_h5 = tmp_path / "avg.h5"
    wavg.combine(files["h5"], out_h5)
    with h5py.File(files["h5"][-1]) as src, h5py.File(out_h5) as dst:
        assert dict(src.attrs) == dict(dst.attrs)
        assert list(src["model_weights"].attrs["layer_names"]) == list(
            dst["model_weights"].attrs["layer_names"]
        )
    out_keras = tmp_path / "avg.keras"
    wavg.combine(files["keras"], out_keras)
    with zipfile.ZipFile(files["keras"][-1]) as src, zipfile.ZipFile(out_keras) as dst:
        for member in ("config.json", "metadata.json"):
            assert src.read(member) == dst.read(member)
        json.loads(dst.read("config.json"))
        assert dst.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED


@pytest.mark.parametrize("fmt", ["h5", "keras"])
def test_drop_optimizer_removes_optimizer_state_and_the_model_still_loads(
    runs, keras_module, tmp_path, fmt
):
    out = tmp_path / f"avg.{fmt}"
    summary = wavg.combine(runs["mlp"].files[fmt], out, drop_optimizer=True)
    assert summary.dropped_optimizer
    names = h5_tensors(out)
    assert not [n for n in names if n.startswith(("optimizer/", "optimizer_weights/"))]
    model = keras_module.models.load_model(out)
    assert len(model.get_weights()) == len(runs["mlp"].weights[0])


def test_sample_checkpoints_average_like_the_tutorial(keras_module, tmp_path):
    from support.reference import SAMPLES

    files = sorted(SAMPLES.glob("model_49*.h5"))
    assert len(files) == 10
    out = tmp_path / "avg.h5"
    wavg.combine([str(f) for f in files], out, scheme="exp", alpha=2)
    members = [keras_module.models.load_model(f).get_weights() for f in files]
    got = keras_module.models.load_model(out).get_weights()
    for i, tensor in enumerate(got):
        assert_exact_average(tensor, [m[i] for m in members], raw_weights(10, "exp", 2.0))


def test_output_name_must_match_the_input_format(runs, tmp_path):
    with pytest.raises(wavg.WavgError, match=r"must end in \.weights\.h5"):
        wavg.combine(runs["mlp"].files["weights.h5"], tmp_path / "avg.h5")
    with pytest.raises(wavg.WavgError, match=r"must end in \.h5"):
        wavg.combine(runs["mlp"].files["h5"], tmp_path / "avg.weights.h5")
    assert not list(tmp_path.iterdir())
