"""Quantized checkpoints (Keras' model.quantize): refused by default, requantized on request.

Every file here is written by Keras 3 itself. The requantize tests check the issue's contract
directly: wavg's output must be byte for byte what Keras writes when it quantizes, with the
same mode, a float model whose kernels are the average of the inputs' dequantized kernels.
"""

from __future__ import annotations

import functools
import gc
import io
import json
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.kerasfiles import assert_one_line_error, run_wavg, scratch_dir

keras = pytest.importorskip("keras")

SUFFIX = {"keras": ".keras", "weights.h5": ".weights.h5", "h5": ".h5"}
HINT = "model.quantize"


def _config(mode: str):
    """(mode, config) for model.quantize: "int4/4" is int4 in groups of 4, "int4/-1" per channel."""
    if "/" in mode:
        return "int4", keras.quantizers.Int4QuantizationConfig(block_size=int(mode.split("/")[1]))
    return mode, None


def _float_model(seed: int = 0, only_dense: bool = False):
    """Embedding -> EinsumDense (2-D and 3-D kernels) -> Dense, named so legacy .h5 groups
    match across models."""
    inputs = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="emb")(inputs)
    x = keras.layers.EinsumDense("abc,cd->abd", (6, 5), bias_axes="d", name="ein")(x)
    x = keras.layers.EinsumDense("abc,cde->abde", (6, 2, 3), bias_axes="de", name="ein3")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(3, name="out")(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(seed)
    model.set_weights(
        [w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in model.get_weights()]
    )
    return model


def _quantize(model, mode: str, filters=None):
    name, config = _config(mode)
    # Keras runs a full gc.collect() per quantized layer (~0.7 s each under TensorFlow);
    # skipping it changes no value and keeps these tests lean.
    collect, gc.collect = gc.collect, lambda *args: 0
    try:
        if config is None:
            model.quantize(name, filters=filters)
        else:
            model.quantize(config=config, filters=filters)
    finally:
        gc.collect = collect
    return model


def _save(model, path: Path, fmt: str) -> Path:
    if fmt == "weights.h5":
        model.save_weights(path)
    else:
        model.save(path)
    return path


@functools.cache
def _checkpoints(mode: str, fmt: str, filters=None, count: int = 3) -> tuple[list[Path], list]:
    """`count` quantized checkpoints of one model, slightly apart (made once per session;
    tests that damage files copy them first)."""
    out = scratch_dir(f"wavg-q-{mode.replace('/', '_')}-{fmt}-")
    models, paths = [], []
    base = _float_model(0)
    for i in range(count):
        model = _float_model(0)
        rng = np.random.default_rng(100 + i)
        model.set_weights(
            [w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in base.get_weights()]
        )
        _quantize(model, mode, filters)
        paths.append(_save(model, out / f"q_{i}{SUFFIX[fmt]}", fmt))
        models.append(model)
    return paths, models


def _copies(paths: list[Path], directory: Path) -> list[Path]:
    return [Path(shutil.copy(path, directory / path.name)) for path in paths]


# ---------------------------------------------------------------------------------------------
# the reference: Keras quantizing the dequantized average


def _unpack(q, cols):
    return np.asarray(keras.quantizers.unpack_int4(q, cols, axis=-1))


def _dequantized(layer) -> np.ndarray:
    """The float kernel a quantized layer stands for, in float64, from Keras' own variables."""
    mode = layer.quantization_mode
    embedding = isinstance(layer, keras.layers.Embedding)
    q = np.asarray(layer._embeddings if embedding else layer._kernel)
    scale = np.asarray(layer.embeddings_scale if embedding else layer.kernel_scale, np.float64)
    zero = getattr(layer, "embeddings_zero" if embedding else "kernel_zero", None)
    if mode == "int4":
        q = _unpack(q, layer.output_dim if embedding else scale.shape[-1])
    q = q.astype(np.float64)
    if zero is None:
        if embedding:
            return q / scale.reshape(-1)[:, None]
        # Dense and these EinsumDense layers reduce the kernel's first axis.
        return (q.reshape(q.shape[0], -1) / scale.reshape(1, -1)).reshape(q.shape)
    zero = np.asarray(zero, np.float64)
    if embedding:
        groups = np.asarray(layer.g_idx, np.int64)
        return (q - zero[:, groups]) * scale[:, groups]
    groups = np.asarray(layer.g_idx, np.int64)
    return (q - zero[groups, :]) * scale[groups, :]


def _reference(models: list, mode: str, fmt: str, path: Path, filters=None, weights=None) -> Path:
    """Keras' quantization of the float model holding the weighted average of the inputs'
    dequantized kernels (float64 sum of w * value in input order, divided once by the sum
    of the raw weights, rounded to float32), saved as `fmt`."""
    weights = weights or [1.0] * len(models)
    total = float(sum(weights))

    def mean(arrays):
        acc = np.zeros_like(arrays[0])
        for array, w in zip(arrays, weights, strict=True):
            acc += array if w == 1.0 else array * w
        return (acc / total).astype(np.float32)

    ref = _float_model(0)
    for layer in ref.layers:
        if not layer.weights:
            continue
        parts = [m.get_layer(layer.name) for m in models]
        if parts[0].quantization_mode is None:
            values = [[np.asarray(v, np.float64) for v in p.weights] for p in parts]
            layer.set_weights([mean(list(vs)) for vs in zip(*values, strict=True)])
            continue
        kernel = mean([_dequantized(part) for part in parts])
        target = layer.embeddings if isinstance(layer, keras.layers.Embedding) else layer.kernel
        target.assign(kernel.reshape(target.shape))
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(mean([np.asarray(p.bias, np.float64) for p in parts]))
    _quantize(ref, mode, filters)
    return _save(ref, path, fmt)


def _weights(path: Path) -> dict[str, bytes]:
    """Every dataset of the file's weights, as raw bytes with dtype and shape."""
    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as archive:
            source = io.BytesIO(archive.read("model.weights.h5"))
    else:
        source = path
    found = {}
    with h5py.File(source, "r") as h5:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                found[name] = (str(data.dtype), data.shape, np.asarray(data).tobytes())

        h5.visititems(visit)
    return found


# ---------------------------------------------------------------------------------------------
# refusal


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("int8", "keras"),
        ("int8", "weights.h5"),
        ("int8", "h5"),
        ("int4", "keras"),
        ("float8", "weights.h5"),
    ],
)
def test_quantized_checkpoints_are_refused_by_default_and_nothing_is_written(mode, fmt, tmp_path):
    paths, _ = _checkpoints(mode, fmt)
    before = [p.read_bytes() for p in paths]
    code, _, stderr = run_wavg("combine", *paths, "-o", tmp_path / f"avg{SUFFIX[fmt]}")
    assert_one_line_error(code, stderr, str(paths[0]), "quantized", HINT, "wavg combine")
    assert list(tmp_path.iterdir()) == []
    assert [p.read_bytes() for p in paths] == before


def test_float8_is_refused_even_with_requantize(tmp_path):
    paths, _ = _checkpoints("float8", "keras")
    out = tmp_path / "avg.keras"
    code, _, stderr = run_wavg("combine", "--quantized", "requantize", *paths, "-o", out)
    assert_one_line_error(code, stderr, "float8", "amax history", HINT)
    assert not out.exists()


def test_a_model_mixing_quantized_and_float_layers_is_refused_naming_the_quantized_tensor():
    paths, _ = _checkpoints("int8", "h5", "out")
    code, _, stderr = run_wavg("combine", *paths, "-o", paths[0].parent / "never.h5")
    assert_one_line_error(code, stderr, "model_weights/out/out/kernel", "int8")


def test_integer_tensors_that_are_not_quantized_weights_keep_the_copy_warning(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    files = []
    for i in range(2):
        model.save_weights(tmp_path / f"w_{i}.weights.h5")
        with h5py.File(tmp_path / f"w_{i}.weights.h5", "r+") as h5:
            h5.create_dataset("vars/lookup", data=np.arange(32, dtype=np.int64).reshape(4, 8))
        files.append(tmp_path / f"w_{i}.weights.h5")
    code, stdout, stderr = run_wavg("combine", "--json", *files, "-o", tmp_path / "a.weights.h5")
    assert code == 0, stderr
    assert "vars/lookup" in json.loads(stdout)["warnings"][0]


def test_a_file_claiming_quantization_without_its_scale_is_refused_naming_the_kernel(tmp_path):
    paths = _copies(_checkpoints("int8", "h5")[0], tmp_path)
    for path in paths:
        with h5py.File(path, "r+") as h5:
            del h5["model_weights/out/out/kernel_scale"]
    code, _, stderr = run_wavg(
        "combine", "--quantized", "requantize", *paths, "-o", paths[0].parent / "a.h5"
    )
    assert_one_line_error(
        code, stderr, str(paths[0]), "model_weights/out/out/kernel", "without its scale"
    )


def test_a_scale_of_the_wrong_shape_is_refused_naming_the_scale(tmp_path):
    paths = _copies(_checkpoints("int8", "weights.h5")[0], tmp_path)
    for path in paths:
        with h5py.File(path, "r+") as h5:
            del h5["layers/dense/vars/2"]
            h5.create_dataset("layers/dense/vars/2", data=np.ones(7, np.float32))
    code, _, stderr = run_wavg(
        "combine", "--quantized", "requantize", *paths, "-o", tmp_path / "a.weights.h5"
    )
    assert_one_line_error(code, stderr, "layers/dense/vars/2", "(7,)", "fits no int8")
    assert not (tmp_path / "a.weights.h5").exists()


def test_evaluate_refuses_quantized_checkpoints_before_loading_them():
    paths, _ = _checkpoints("int8", "keras")
    code, _, stderr = run_wavg("evaluate", *paths, "--max-n", "1", "--no-ensemble")
    assert_one_line_error(code, stderr, "int8-quantized", HINT)


# ---------------------------------------------------------------------------------------------
# requantize: bit-identical to Keras quantizing the dequantized average


@pytest.mark.parametrize(
    ("mode", "fmt", "scheme"),
    [
        ("int8", "keras", "equal"),
        ("int8", "weights.h5", "equal"),
        ("int8", "h5", "linear"),
        ("int4", "keras", "equal"),
        ("int4", "h5", "equal"),
        ("int4/4", "weights.h5", "linear"),
        ("int4/-1", "keras", "equal"),
    ],
)
def test_requantize_is_bit_identical_to_keras_quantizing_the_dequantized_average(
    mode, fmt, scheme, tmp_path
):
    paths, models = _checkpoints(mode, fmt)
    out = tmp_path / f"avg{SUFFIX[fmt]}"
    code, stdout, stderr = run_wavg(
        "combine", "--json", "--scheme", scheme, "--quantized", "requantize", *paths, "-o", out
    )
    assert code == 0, stderr
    assert json.loads(stdout)["requantized_layers"] == 4
    raw = [1.0, 2.0, 3.0] if scheme == "linear" else None
    ref = _reference(models, mode, fmt, tmp_path / f"ref{SUFFIX[fmt]}", weights=raw)
    expected, got = _weights(ref), _weights(out)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == expected[name], name
    loaded = keras.models.load_model(out) if fmt != "weights.h5" else None
    if loaded is not None:
        assert loaded.get_layer("out").quantization_mode == mode.split("/")[0]


def test_requantize_averages_the_float_layers_of_a_mixed_model_as_usual(tmp_path):
    paths, models = _checkpoints("int4/4", "keras", "ein")
    out = tmp_path / "avg.keras"
    code, _, stderr = run_wavg("combine", "--quantized", "requantize", *paths, "-o", out)
    assert code == 0, stderr
    expected = _weights(_reference(models, "int4/4", "keras", tmp_path / "ref.keras", "ein"))
    assert _weights(out) == expected


@pytest.mark.parametrize(("mode", "fmt"), [("int8", "weights.h5"), ("int4/4", "weights.h5")])
def test_requantize_gives_the_same_bytes_whatever_the_block_size(mode, fmt, tmp_path):
    from wavg.averaging.engine import plan_combine, run_plan

    paths, _ = _checkpoints(mode, fmt)
    plan = plan_combine(paths, scheme="linear")
    outputs = []
    for items in (7, 1 << 20):
        out = tmp_path / f"avg_{items}.weights.h5"
        run_plan(plan, out, quantized="requantize", block_items=items)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_the_python_api_refuses_an_unknown_quantized_policy(tmp_path):
    import wavg
    from wavg.errors import UsageError

    paths, _ = _checkpoints("int8", "keras")
    with pytest.raises(UsageError, match="refuse, requantize"):
        wavg.combine(paths, tmp_path / "a.keras", quantized="average")


def test_model_loading_refuses_quantized_files_before_keras_reads_them():
    from wavg.formats.quantized import QuantizedCheckpoint
    from wavg.workflows.model_loading import load_model, load_weights

    with pytest.raises(QuantizedCheckpoint, match="int8-quantized"):
        load_model(_checkpoints("int8", "keras")[0][0])
    with pytest.raises(QuantizedCheckpoint, match="int8-quantized"):
        load_weights(_float_model(0), _checkpoints("int8", "weights.h5")[0][0])


# ---------------------------------------------------------------------------------------------
# the numpy quantizer against Keras' own, on random matrices cut into random row blocks


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 9),
    axis=st.sampled_from([0, 1]),
    mode=st.sampled_from(["int8", "int4", "int4/1", "int4/3", "int4/5", "int4/16"]),
    block_rows=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    offset=st.sampled_from([0.0, 1.0, -1.0]),
)
def test_blockwise_requantize_math_equals_keras_quantizers(
    rows, cols, axis, mode, block_rows, seed, offset
):
    from wavg.averaging.requantize import Statistics, quantize
    from wavg.formats.quantized import Geometry

    name, _, size = mode.partition("/")
    block = int(size) if size else None
    matrix = (np.random.default_rng(seed).normal(0, 1, (rows, cols)) + offset).astype(np.float32)
    geo = Geometry(name, rows, cols, axis, block)
    stats = Statistics(geo)
    for first in range(0, rows, block_rows):
        stats.update(matrix[first : first + block_rows], first)
    scale, zero, zero_stored = stats.finish()
    got = np.concatenate(
        [
            quantize(matrix[first : first + block_rows], geo, scale, zero, first)
            for first in range(0, rows, block_rows)
        ]
    )
    quantizers = keras.quantizers
    low_high = (-8, 7) if name == "int4" else (-127, 127)
    if block is None:
        values, want_scale = quantizers.abs_max_quantize(matrix, axis, low_high, to_numpy=True)
        want_zero = None
    else:
        source = matrix if axis == 0 else matrix.T
        values, want_scale, want_zero = quantizers.abs_max_quantize_grouped_with_zero_point(
            source, block, to_numpy=True
        )
        if axis == 1:
            values, want_scale, want_zero = (
                np.asarray(a).T for a in (values, want_scale, want_zero)
            )
    values = np.asarray(values)
    if name == "int4":
        values = np.asarray(quantizers.pack_int4(values, axis=-1)[0])
    assert got.tobytes() == values.tobytes()
    assert scale.tobytes() == np.asarray(want_scale, np.float32).reshape(scale.shape).tobytes()
    if want_zero is not None:
        assert zero_stored.tobytes() == np.asarray(want_zero).astype(np.int8).tobytes()


def test_requantize_refuses_a_weights_file_that_does_not_record_the_int4_group_size(tmp_path):
    paths, _ = _checkpoints("int4", "weights.h5")
    out = tmp_path / "avg.weights.h5"
    code, _, stderr = run_wavg("combine", "--quantized", "requantize", *paths, "-o", out)
    assert_one_line_error(code, stderr, "layers/", "group size", "not recorded", ".keras", HINT)
    assert not out.exists()


def _einsum_checkpoints(equation: str, shape, features, directory: Path):
    def build():
        inputs = keras.Input(features)
        return keras.Model(inputs, keras.layers.EinsumDense(equation, shape, name="e")(inputs))

    base = build().get_weights()
    models, paths = [], []
    for i in range(3):
        model = build()
        rng = np.random.default_rng(i)
        model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in base])
        _quantize(model, "int8")
        paths.append(_save(model, directory / f"e_{i}.keras", "keras"))
        models.append(model)
    return paths, models, build


def test_requantize_handles_an_einsum_kernel_reduced_along_its_last_axis(tmp_path):
    paths, models, build = _einsum_checkpoints("ab,cb->ac", 3, (4,), tmp_path)
    code, _, stderr = run_wavg(
        "combine", "--quantized", "requantize", *paths, "-o", tmp_path / "a.keras"
    )
    assert code == 0, stderr
    acc = np.zeros((3, 4))
    for model in models:  # kernel (3, 4) "cb": one scale per row c
        layer = model.get_layer("e")
        acc += np.asarray(layer._kernel, np.float64) / np.asarray(
            layer.kernel_scale, np.float64
        ).reshape(-1, 1)
    ref = build()
    ref.get_layer("e").kernel.assign((acc / 3).astype(np.float32))
    _quantize(ref, "int8")
    assert _weights(tmp_path / "a.keras") == _weights(_save(ref, tmp_path / "r.keras", "keras"))


def test_requantize_refuses_an_einsum_whose_scale_reorders_the_kernel_axes(tmp_path):
    paths, _, _ = _einsum_checkpoints("abc,cde->aed", (3, 2), (5, 4), tmp_path)
    code, _, stderr = run_wavg(
        "combine", "--quantized", "requantize", *paths, "-o", tmp_path / "a.keras"
    )
    assert_one_line_error(code, stderr, "EinsumDense", "abc,cde->aed", HINT)
    assert not (tmp_path / "a.keras").exists()
