"""The case-study data and user .npz files: shapes, validation and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from support.kerasfiles import assert_one_line_error, run_wavg

from wavg.workflows.data import DataError, blobs, check_fits_model, load_data, load_npz


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _arrays(n_train=20, n_test=10, features=2):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(n_train, features)),
        "y_train": np.eye(3)[rng.integers(0, 3, n_train)],
        "x_test": rng.normal(size=(n_test, features)),
        "y_test": np.eye(3)[rng.integers(0, 3, n_test)],
    }


def test_blobs_give_100_training_and_1000_test_samples_with_one_hot_labels():
    data = load_data("blobs")
    assert data.x_train.shape == (100, 2) and data.x_test.shape == (1000, 2)
    assert data.y_train.shape == (100, 3) and data.y_test.shape == (1000, 3)
    assert set(np.unique(data.y_test)) == {0.0, 1.0}
    assert (data.y_test.sum(axis=1) == 1).all()


def test_blobs_are_the_same_on_every_call():
    assert np.array_equal(blobs().x_train, blobs().x_train)


def test_an_npz_with_the_four_arrays_loads_as_float32(tmp_path):
    data = load_npz(_write_npz(tmp_path / "d.npz", **_arrays()))
    assert data.x_train.shape == (20, 2) and data.x_test.dtype == np.float32
    assert data.name.endswith("d.npz")


def test_an_npz_missing_an_array_names_the_file_and_the_array(tmp_path):
    arrays = _arrays()
    del arrays["y_test"]
    with pytest.raises(DataError, match=r"d\.npz: missing array\(s\) y_test"):
        load_npz(_write_npz(tmp_path / "d.npz", **arrays))


def test_x_and_y_of_different_lengths_are_refused(tmp_path):
    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"][:5]
    with pytest.raises(DataError, match="x_train has 20 samples but y_train has 5"):
        load_npz(_write_npz(tmp_path / "d.npz", **arrays))


def test_train_and_test_with_different_sample_shapes_are_refused(tmp_path):
    arrays = _arrays()
    arrays["x_test"] = np.zeros((10, 5))
    with pytest.raises(DataError, match="x_train samples have shape"):
        load_npz(_write_npz(tmp_path / "d.npz", **arrays))


def test_an_npz_holding_object_arrays_is_refused_without_unpickling(tmp_path):
    arrays = _arrays()
    arrays["x_train"] = np.array([{"a": 1}] * 20, dtype=object)
    with pytest.raises(DataError, match="without pickle"):
        load_npz(_write_npz(tmp_path / "d.npz", **arrays))


def test_a_file_that_is_not_an_npz_is_refused(tmp_path):
    bad = tmp_path / "d.npz"
    bad.write_text("not a zip")
    with pytest.raises(DataError, match="d.npz"):
        load_npz(bad)


def test_data_whose_features_do_not_fit_the_model_input_is_refused():
    with pytest.raises(DataError, match=r"x samples have shape \(2,\).*expects \(5,\)"):
        check_fits_model(blobs(), (None, 5), (None, 3))


def test_integer_labels_fit_any_output():
    data = blobs()
    sparse = type(data)("s", data.x_train, data.y_train.argmax(1), data.x_test, data.y_test[:, 0])
    check_fits_model(sparse, (None, 2), (None, 3))


def test_train_save_with_a_missing_data_file_fails_in_one_line(tmp_path):
    code, _, err = run_wavg("train-save", "--data", tmp_path / "none.npz", "--out-dir", tmp_path)
    assert_one_line_error(code, err, "none.npz", "no such data file")


def test_train_save_with_data_that_the_built_in_model_cannot_take_fails_in_one_line(tmp_path):
    data = _write_npz(tmp_path / "d.npz", **_arrays(features=4))
    code, _, err = run_wavg("train-save", "--data", data, "--out-dir", tmp_path / "o")
    assert_one_line_error(code, err, "--model FILE.keras", exit_code=2)
