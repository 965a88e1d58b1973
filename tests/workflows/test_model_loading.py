"""Safe loading: the stored config is inspected before Keras runs anything in it."""

from __future__ import annotations

import json
import shutil
import zipfile

import h5py
import pytest
from support.kerasfiles import assert_one_line_error, run_wavg, short_run, tiny_model

from wavg.errors import CheckpointError, UnsafeCheckpoint, WavgError
from wavg.workflows.model_loading import (
    import_keras,
    load_model,
    read_model_config,
    unsafe_references,
)

# `backend`: `make test` runs these again on JAX (KERAS_BACKEND=jax).
pytestmark = [pytest.mark.backend, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
keras = import_keras()
OS_SYSTEM = {"module": "os", "class_name": "function", "config": "system", "registered_name": None}


def _lambda_model(marker):
    """A model whose Lambda layer creates `marker` whenever the layer is built or called."""
    # A plain lambda without closure cells, so Keras can serialize its bytecode.
    payload = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")
    net = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(payload), keras.layers.Dense(3)])
    net.compile(loss="mse")
    marker.unlink()  # building the model ran the payload once; start clean
    return net


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_lambda_layer_is_refused_and_its_code_never_runs(tmp_path, suffix):
    marker = tmp_path / "payload-ran"
    path = tmp_path / f"model_1{suffix}"
    _lambda_model(marker).save(path)
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeCheckpoint, match="Lambda layer.*--trust-file"):
        load_model(path)
    code, _, err = run_wavg("evaluate", path)
    assert_one_line_error(code, err, "Lambda", "--trust-file")
    assert not marker.exists()


def test_trusting_the_file_loads_the_lambda_layer(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "model_1.keras"
    _lambda_model(marker).save(path)
    marker.unlink(missing_ok=True)
    load_model(path, trust=True)
    assert marker.exists()  # what --trust-file means: the file's code runs


def _edit_keras_config(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            zout.writestr(item, data)


def _set_activation(layer_config):
    layer_config["config"]["activation"] = OS_SYSTEM


def test_a_keras_file_naming_os_system_is_refused(tmp_path):
    plain = tmp_path / "plain.keras"
    tiny_model(keras).save(plain)
    evil = tmp_path / "model_1.keras"
    _edit_keras_config(plain, evil, lambda c: _set_activation(c["config"]["layers"][0]))
    with pytest.raises(UnsafeCheckpoint, match=r"os\.system.*--trust-file"):
        load_model(evil)
    code, _, err = run_wavg("evaluate", evil)
    assert_one_line_error(code, err, "os.system", "--trust-file")


def test_a_legacy_h5_naming_os_system_is_refused(tmp_path):
    path = tmp_path / "model_1.h5"
    shutil.copy(short_run()[-1], path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        _set_activation(config["config"]["layers"][1])
        f.attrs["model_config"] = json.dumps(config)
    with pytest.raises(UnsafeCheckpoint, match=r"os\.system"):
        load_model(path)


def test_a_loss_from_outside_keras_in_the_training_config_is_refused(tmp_path):
    path = tmp_path / "model_1.h5"
    shutil.copy(short_run()[-1], path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["training_config"])
        config["loss"] = OS_SYSTEM
        f.attrs["training_config"] = json.dumps(config)
    with pytest.raises(UnsafeCheckpoint, match=r"os\.system"):
        load_model(path)


def test_tfsm_layers_and_file_vocabularies_are_reported():
    config = {
        "layers": [
            {"class_name": "TFSMLayer", "config": {"filepath": "/tmp/x"}},
            {"class_name": "StringLookup", "config": {"vocabulary": "/etc/passwd"}},
        ]
    }
    found = unsafe_references(config)
    assert any("TFSMLayer" in f for f in found) and any("vocabulary" in f for f in found)


def test_the_case_study_checkpoints_are_safe_and_load():
    net = load_model(short_run()[-1])
    assert net.output_shape == (None, 3)


LAYER_MODULE = """
import keras


@keras.saving.register_keras_serializable(package="wavgtest")
class Doubler(keras.layers.Layer):
    def call(self, x):
        return 2 * x
"""


def test_a_custom_layer_needs_its_module_passed_as_custom_objects(tmp_path, monkeypatch):
    (tmp_path / "wavgtest_layers.py").write_text(LAYER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import wavgtest_layers

    net = keras.Sequential([keras.Input((2,)), wavgtest_layers.Doubler(), keras.layers.Dense(3)])
    net.compile(loss="mse")
    path = tmp_path / "custom.keras"
    net.save(path)
    with pytest.raises(UnsafeCheckpoint, match="--custom-objects MODULE"):
        load_model(path)
    loaded = load_model(path, custom_objects="wavgtest_layers")
    assert type(loaded.layers[0]).__name__ == "Doubler"


def test_an_unknown_class_explains_custom_objects(tmp_path):
    plain = tmp_path / "plain.keras"
    tiny_model(keras).save(plain)
    odd = tmp_path / "odd.keras"

    def rename(config):
        config["config"]["layers"][0]["class_name"] = "NoSuchLayer"

    _edit_keras_config(plain, odd, rename)
    with pytest.raises(
        CheckpointError, match="unknown class '[a-z.]*NoSuchLayer'.*--custom-objects"
    ):
        load_model(odd)


def test_a_file_without_a_model_config_is_not_a_model(tmp_path):
    path = tmp_path / "model_1.h5"
    with h5py.File(path, "w") as f:
        f["x"] = [1.0]
    with pytest.raises(CheckpointError, match="no model config"):
        read_model_config(path)


def test_an_old_keras_is_refused(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.13.1")
    with pytest.raises(WavgError, match=r"keras >= 3\.13\.2"):
        import_keras()


def test_keras_own_functions_stored_as_builtins_are_allowed_but_python_builtins_are_not():
    keras_loss = {
        "module": "builtins",
        "class_name": "function",
        "config": "categorical_crossentropy",
    }
    python_eval = {"module": "builtins", "class_name": "function", "config": "eval"}
    assert unsafe_references({"loss": keras_loss}) == []
    assert unsafe_references({"loss": python_eval}) == [
        "a reference to builtins.eval (outside keras)"
    ]


def test_a_model_file_linking_outside_itself_is_refused_before_keras_reads_it(tmp_path):
    path = tmp_path / "model_1.h5"
    shutil.copy(short_run()[-1], path)
    with h5py.File(path, "r+") as f:
        f["model_weights/extra"] = h5py.ExternalLink("/etc/passwd", "/x")
    with pytest.raises(UnsafeCheckpoint, match="external link"):
        load_model(path)
