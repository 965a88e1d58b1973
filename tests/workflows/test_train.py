"""train-save: the case-study run by default, deterministic with a seed, clear failures."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
from support.kerasfiles import assert_one_line_error, run_wavg, short_run

from wavg.errors import UsageError
from wavg.workflows.train import train_save

# `backend`: `make test` runs these again on JAX (KERAS_BACKEND=jax).
pytestmark = [pytest.mark.backend, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _tensors(path):
    found = {}

    def collect(name, obj):
        if isinstance(obj, h5py.Dataset):
            found[name] = obj[()]

    with h5py.File(path, "r") as f:
        f.visititems(collect)
    return found


def test_the_same_seed_gives_identical_weights(tmp_path):
    first = short_run(seed=3, epochs=6, keep=2)
    again = train_save(tmp_path, epochs=6, keep=2, seed=3).files
    assert [p.name for p in again] == ["model_4.h5", "model_5.h5"]
    for a, b in zip(first, again, strict=True):
        ta, tb = _tensors(a), _tensors(b)
        assert ta.keys() == tb.keys() and len(ta) > 0
        for name in ta:
            assert np.array_equal(ta[name], tb[name]), name


def test_a_different_seed_gives_different_weights():
    a = _tensors(short_run(seed=3, epochs=6, keep=2)[-1])
    b = _tensors(short_run(seed=4, epochs=6, keep=2)[-1])
    kernel = next(name for name in a if name.startswith("model_weights") and "hidden" in name)
    assert not np.array_equal(a[kernel], b[kernel])


def test_train_save_keeps_the_last_k_epochs_numbered_from_zero(tmp_path):
    code, out, err = run_wavg(
        "train-save", "--epochs", 5, "--keep", 3, "--seed", 1, "--out-dir", tmp_path
    )
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model_2.h5",
        "model_3.h5",
        "model_4.h5",
    ]
    assert out.startswith("saved 3 checkpoints model_2.h5 ... model_4.h5")
    assert "accuracy" in out


def test_quiet_prints_nothing(tmp_path):
    code, out, err = run_wavg(
        "train-save", "--epochs", 2, "--keep", 1, "--quiet", "--out-dir", tmp_path
    )
    assert (code, out, err) == (0, "", "")


def test_train_save_writes_keras_files_with_sgd(tmp_path):
    code, _, err = run_wavg(
        "train-save", "--epochs", 3, "--keep", 2, "--optimizer", "sgd", "--format", "keras",
        "--out-dir", tmp_path, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_1.keras", "model_2.keras"]


def test_keep_more_than_epochs_is_a_usage_error(tmp_path):
    code, _, err = run_wavg("train-save", "--epochs", 3, "--keep", 5, "--out-dir", tmp_path)
    assert_one_line_error(code, err, "--keep", exit_code=2)


def test_an_out_dir_that_is_a_file_fails_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_wavg("train-save", "--epochs", 2, "--keep", 1, "--out-dir", blocker)
    assert_one_line_error(code, err, "not a directory")
    code, _, err = run_wavg("train-save", "--epochs", 2, "--keep", 1, "--out-dir", blocker / "x")
    assert_one_line_error(code, err, "cannot write checkpoints")


def test_optimizer_cannot_be_combined_with_a_model_file(tmp_path):
    with pytest.raises(UsageError, match="compiled with"):
        train_save(tmp_path, model=tmp_path / "m.keras", optimizer="sgd")


def test_a_learning_rate_must_be_positive_and_is_for_the_built_in_model_only(tmp_path):
    code, _, err = run_wavg(
        "train-save", "--epochs", 2, "--keep", 1, "--lr", -1, "--out-dir", tmp_path
    )
    assert_one_line_error(code, err, "--lr", exit_code=2)
    with pytest.raises(UsageError, match="--lr"):
        train_save(tmp_path, model=tmp_path / "m.keras", learning_rate=0.1)


def test_the_learning_rate_and_batch_size_reach_the_optimizer_and_fit(tmp_path):
    import keras

    result = train_save(
        tmp_path, epochs=2, keep=1, optimizer="sgd", learning_rate=0.25, batch_size=50, seed=1
    )
    net = keras.models.load_model(result.files[-1])
    assert float(net.optimizer.learning_rate) == pytest.approx(0.25)
    assert int(net.optimizer.iterations) == 2 * 2  # 100 samples in batches of 50, 2 epochs


def test_importing_wavg_and_its_cli_does_not_import_tensorflow_or_keras():
    code = (
        "import sys, wavg, wavg.cli, wavg.workflows.data, wavg.workflows.model_loading, wavg.workflows.evaluate, wavg.workflows.plot;"
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules];"
        "print(*bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
