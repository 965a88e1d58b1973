"""`wavg bn-update`: BatchNormalization statistics recomputed on real Keras Conv+BN models.

References are independent of wavg's code: a numpy forward pass for a Sequential model, and
Keras' own BN update with a per-batch momentum of (k-1)/k (the cumulative average, called
eagerly) for a Functional model with branches and a nested sub-model.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from support.kerasfiles import assert_one_line_error, run_wavg

from wavg.workflows.bn_update import bn_update

# `backend`: `make test` runs these again on JAX (KERAS_BACKEND=jax).
pytestmark = pytest.mark.backend

FORMATS = ("h5", "keras", "weights.h5")
BATCH = 16


def _sequential(keras):
    return keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn_conv"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(5, name="dense"),
            keras.layers.BatchNormalization(name="bn_dense"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ],
        name="seq",
    )


def _branches(keras):
    inp = keras.Input((6, 6, 1), name="image")
    left = keras.layers.BatchNormalization(name="bn_left")(keras.layers.Conv2D(2, 3)(inp))
    frozen = keras.layers.BatchNormalization(name="bn_frozen")
    frozen.trainable = False
    right = frozen(keras.layers.Conv2D(2, 3)(inp))
    joined = keras.layers.Flatten()(keras.layers.Concatenate()([left, right]))
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax")(joined), name="branches")


def _nested(keras):
    inner = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(3, 3, name="inner_conv"),
            keras.layers.BatchNormalization(name="inner_bn"),
            keras.layers.Activation("relu"),
        ],
        name="inner",
    )
    inp = keras.Input((6, 6, 1))
    hidden = keras.layers.Dense(4, name="mid")(keras.layers.Flatten()(inner(inp)))
    hidden = keras.layers.BatchNormalization(name="outer_bn")(hidden)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax")(hidden), name="nested")


def _plain(keras):
    return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])


BUILDERS = {"seq": _sequential, "branches": _branches, "nested": _nested, "plain": _plain}


@pytest.fixture(scope="module")
def models(tmp_path_factory, keras_module) -> dict[str, dict[str, Path]]:
    """Each model trained briefly (so its statistics are not the defaults), in each format."""
    keras = keras_module
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(40, 6, 6, 1)) * 2 + 1).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, len(x)), 3)
    directory = tmp_path_factory.mktemp("bn")
    np.savez(directory / "train.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    files: dict[str, dict[str, Path]] = {"data": {"npz": directory / "train.npz"}}
    for name, build in BUILDERS.items():
        net = build(keras)
        # A named optimizer: an unnamed one takes Keras' next automatic name (adam_1, ...),
        # which would rename the optimizer state of files other tests make later.
        optimizer = keras.optimizers.Adam(name=f"bn_test_{name}")
        net.compile(optimizer=optimizer, loss="categorical_crossentropy")
        net.fit(x, y, epochs=1, batch_size=8, verbose=0)
        files[name] = {}
        for fmt in FORMATS:
            path = directory / f"{name}.{fmt}"
            net.save_weights(path) if fmt == "weights.h5" else net.save(path)
            files[name][fmt] = path
    return files


def _x(models) -> np.ndarray:
    with np.load(models["data"]["npz"]) as npz:
        return npz["x_train"]


def _update(models, name: str, fmt: str, out: Path):
    model = models[name]["keras"] if fmt == "weights.h5" else None
    return bn_update(models[name][fmt], models["data"]["npz"], out, model=model, batch_size=BATCH)


def _stats(keras, path: Path, architecture: Path | None = None) -> dict[str, list[np.ndarray]]:
    net = keras.models.load_model(architecture or path, compile=False)
    if architecture is not None:
        net.load_weights(path)
    return {
        layer.name: [np.array(layer.moving_mean), np.array(layer.moving_variance)]
        for layer in net._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    }


def _numpy_statistics(net, x: np.ndarray) -> dict[str, list[np.ndarray]]:
    """The Sequential model's forward pass in numpy: BN in training mode, Dropout off."""
    conv_k, conv_b = net.get_layer("conv").get_weights()
    dense_k, dense_b = net.get_layer("dense").get_weights()
    found: dict[str, list[list[np.ndarray]]] = {"bn_conv": [], "bn_dense": []}

    def batch_norm(name: str, h: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        layer = net.get_layer(name)
        gamma, beta = (np.asarray(w, np.float64) for w in layer.get_weights()[:2])
        mean, var = h.mean(axis=axes), h.var(axis=axes)
        found[name].append([mean, var])
        return gamma * (h - mean) / np.sqrt(var + layer.epsilon) + beta

    for start in range(0, len(x), BATCH):
        batch = x[start : start + BATCH].astype(np.float64)
        windows = np.lib.stride_tricks.sliding_window_view(batch, (3, 3), axis=(1, 2))
        h = np.einsum("nhwcij,ijco->nhwo", windows, conv_k) + conv_b
        h = batch_norm("bn_conv", h, (0, 1, 2))
        h = h.reshape(len(h), -1) @ dense_k + dense_b
        batch_norm("bn_dense", h, (0,))
    return {name: list(np.mean(np.array(v), axis=0)) for name, v in found.items()}


def _keras_cumulative_statistics(keras, path: Path, x: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Keras' own BN update, eagerly, with momentum (k-1)/k at batch k: the batch average."""
    net = keras.models.load_model(path, compile=False)
    layers = [
        layer
        for layer in net._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for k, start in enumerate(range(0, len(x), BATCH), start=1):
        for layer in layers:
            layer.momentum = (k - 1) / k
        net(x[start : start + BATCH], training=True)
    return {
        layer.name: [np.array(layer.moving_mean), np.array(layer.moving_variance)]
        for layer in layers
    }


def test_sequential_statistics_match_a_numpy_forward_pass_with_dropout_off(
    models, keras_module, tmp_path
):
    out = tmp_path / "seq_bn.h5"
    result = _update(models, "seq", "h5", out)
    assert result.updated == ["bn_conv", "bn_dense"] and result.batches == 3
    net = keras_module.models.load_model(models["seq"]["h5"], compile=False)
    expected = _numpy_statistics(net, _x(models))
    got = _stats(keras_module, out)
    for name, (mean, var) in expected.items():
        np.testing.assert_allclose(got[name][0], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[name][1], var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["branches", "nested"])
def test_branches_and_nested_models_match_keras_cumulative_momentum_update(
    models, keras_module, tmp_path, name
):
    out = tmp_path / f"{name}_bn.keras"
    _update(models, name, "keras", out)
    expected = _keras_cumulative_statistics(keras_module, models[name]["keras"], _x(models))
    got = _stats(keras_module, out)
    assert set(got) == set(expected)
    for layer, (mean, var) in expected.items():
        np.testing.assert_allclose(got[layer][0], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[layer][1], var, rtol=1e-5, atol=1e-6)


def _weights_file(path: Path) -> h5py.File:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    return h5py.File(path, "r")


def _weights_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return archive.read("model.weights.h5")
    return path.read_bytes()


def _changed_tensors(src: Path, out: Path) -> set[str]:
    """Names of the datasets whose bytes hold every byte where `out` differs from `src`;
    fails if a difference lies outside every dataset."""
    before, after = (
        np.frombuffer(_weights_bytes(src), np.uint8),
        np.frombuffer(_weights_bytes(out), np.uint8),
    )
    assert before.shape == after.shape
    differ = np.flatnonzero(before != after)
    ranges = {}
    with _weights_file(out) as h5:
        h5.visititems(
            lambda n, o: (
                ranges.__setitem__(n, (o.id.get_offset(), o.id.get_storage_size()))
                if isinstance(o, h5py.Dataset) and o.id.get_offset() is not None
                else None
            )
        )
    owners = set()
    for position in differ:
        owner = [n for n, (start, size) in ranges.items() if start <= position < start + size]
        assert owner, f"byte {position} differs outside every tensor"
        owners.add(owner[0])
    return owners


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_differs_from_the_average_only_in_the_moving_statistics_in_every_format(
    models, keras_module, tmp_path, fmt
):
    out = tmp_path / f"nested_bn.{fmt}"
    _update(models, "nested", fmt, out)
    source = models["nested"][fmt]
    changed = _changed_tensors(source, out)
    assert len(changed) == 4  # moving mean and variance of inner_bn and outer_bn
    if fmt == "keras":
        with zipfile.ZipFile(out) as new, zipfile.ZipFile(source) as old:
            assert new.namelist() == old.namelist()
            for member in old.namelist():
                if member != "model.weights.h5":
                    assert new.read(member) == old.read(member)
    architecture = models["nested"]["keras"] if fmt == "weights.h5" else None
    got = _stats(keras_module, out, architecture)
    expected = _keras_cumulative_statistics(keras_module, models["nested"]["keras"], _x(models))
    for layer, (mean, var) in expected.items():
        np.testing.assert_allclose(got[layer][0], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[layer][1], var, rtol=1e-5, atol=1e-6)


def test_a_second_run_gives_the_same_bytes(models, tmp_path):
    first, second = tmp_path / "a.h5", tmp_path / "b.h5"
    _update(models, "seq", "h5", first)
    _update(models, "seq", "h5", second)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)]
    assert digest[0] == digest[1]


def test_frozen_layers_keep_their_statistics_and_are_reported(models, keras_module, tmp_path):
    out = tmp_path / "branches_bn.h5"
    code, stdout, stderr = run_wavg(
        "bn-update", models["branches"]["h5"], "--data", models["data"]["npz"], "-o", out
    )
    assert code == 0, stderr
    assert "frozen" in stderr and "bn_frozen" in stderr
    assert "1 BatchNormalization layer(s) recalibrated" in stdout
    before, after = _stats(keras_module, models["branches"]["h5"]), _stats(keras_module, out)
    for a, b in zip(before["bn_frozen"], after["bn_frozen"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(before["bn_left"][0], after["bn_left"][0])


def test_a_model_without_batchnorm_exits_0_with_one_note_and_writes_nothing(models, tmp_path):
    out = tmp_path / "plain_bn.h5"
    code, stdout, stderr = run_wavg(
        "bn-update", models["plain"]["h5"], "--data", models["data"]["npz"], "-o", out
    )
    assert code == 0 and stdout == ""
    assert stderr.strip().count("\n") == 0 and "no trainable BatchNormalization" in stderr
    assert not out.exists()


def _bad_input_cases(models, tmp_path):
    npz = models["data"]["npz"]
    no_x = tmp_path / "no_x.npz"
    np.savez(no_x, y_train=np.zeros(3), x_test=np.zeros(3), y_test=np.zeros(3))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{k: np.zeros((4, 5)) for k in ("x_train", "y_train", "x_test", "y_test")})
    seq = models["seq"]
    return {
        "missing data": ([seq["h5"], "--data", tmp_path / "none.npz"], 1, "no such data file"),
        "no x_train": ([seq["h5"], "--data", no_x], 1, "x_train"),
        "wrong shape": ([seq["h5"], "--data", wrong], 1, "expects"),
        "weights without model": ([seq["weights.h5"], "--data", npz], 1, "--model"),
        "wrong output suffix": ([seq["keras"], "--data", npz], 2, ".keras"),
        "missing checkpoint": ([tmp_path / "gone.h5", "--data", npz], 1, "no such file"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing data",
        "no x_train",
        "wrong shape",
        "weights without model",
        "wrong output suffix",
        "missing checkpoint",
    ],
)
def test_bad_input_is_one_line_with_nothing_written(models, tmp_path, case):
    args, exit_code, word = _bad_input_cases(models, tmp_path)[case]
    out = tmp_path / "out.h5"
    before = {p: p.read_bytes() for p in models["seq"].values()}
    code, _, stderr = run_wavg("bn-update", *args, "-o", out)
    assert_one_line_error(code, stderr, word, exit_code=exit_code)
    assert not out.exists() and not list(tmp_path.glob(".out.h5*"))
    assert before == {p: p.read_bytes() for p in models["seq"].values()}


def test_the_model_may_be_an_unzipped_keras_folder_as_combine_accepts(
    keras_module, models, tmp_path
):
    """--model is read through combine's registry: an unzipped .keras folder Keras wrote
    gives the architecture exactly as the .keras archive does."""
    seq = models["seq"]
    folder = tmp_path / "seq_model"
    keras_module.models.load_model(seq["keras"]).save(folder, zipped=False)
    from_archive, from_folder = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    args = (seq["weights.h5"], "--data", models["data"]["npz"], "--batch-size", BATCH)
    assert run_wavg("bn-update", *args, "--model", seq["keras"], "-o", from_archive)[0] == 0
    code, _, stderr = run_wavg("bn-update", *args, "--model", folder, "-o", from_folder)
    assert code == 0, stderr
    assert from_folder.read_bytes() == from_archive.read_bytes()


def test_a_model_holding_code_is_refused_before_keras_loads_it(keras_module, models, tmp_path):
    keras = keras_module
    net = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Lambda(lambda t: t * 2),
            keras.layers.BatchNormalization(),
        ]
    )
    path = tmp_path / "lambda.keras"
    net.save(path)
    out = tmp_path / "out.keras"
    code, _, stderr = run_wavg("bn-update", path, "--data", models["data"]["npz"], "-o", out)
    assert_one_line_error(code, stderr, "Lambda")
    assert not out.exists()


def test_a_shared_layer_averages_over_every_call(keras_module, tmp_path):
    keras = keras_module
    inp = keras.Input((4,))
    shared = keras.layers.BatchNormalization(name="shared_bn")
    left = shared(keras.layers.Dense(3, name="a")(inp))
    right = shared(keras.layers.Dense(3, name="b")(inp))
    net = keras.Model(inp, keras.layers.Concatenate()([left, right]))
    path, data = tmp_path / "shared.keras", tmp_path / "data.npz"
    net.save(path)
    x = np.random.default_rng(5).normal(size=(24, 4)).astype("float32")
    np.savez(data, x_train=x, y_train=x, x_test=x, y_test=x)
    out = tmp_path / "shared_bn.keras"
    bn_update(path, data, out, batch_size=10)
    hidden = [x @ w + b for w, b in (net.get_layer(n).get_weights() for n in ("a", "b"))]
    batches = [h[s : s + 10].astype(np.float64) for h in hidden for s in (0, 10, 20)]
    got = _stats(keras, out)["shared_bn"]
    np.testing.assert_allclose(got[0], np.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    np.testing.assert_allclose(got[1], np.mean([b.var(0) for b in batches], 0), rtol=1e-5)
