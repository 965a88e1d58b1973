"""evaluate's greedy and +bn columns: the soup and bn-update beside the averaging schemes."""

from __future__ import annotations

import numpy as np
import pytest
from support.kerasfiles import assert_one_line_error, digits_run, run_wavg, short_run

import wavg
from wavg.workflows.bn_update import bn_update
from wavg.workflows.data import blobs, digits
from wavg.workflows.evaluate import evaluate
from wavg.workflows.model_loading import import_keras
from wavg.workflows.soup import soup

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _scores(path, data) -> dict[str, float]:
    net = import_keras().models.load_model(path)
    return net.evaluate(data.x_test, data.y_test, verbose=0, return_dict=True)


def test_the_greedy_column_is_the_soup_of_the_n_newest_scored_on_test(tmp_path):
    run = short_run()
    result = evaluate(run, "blobs", schemes=["equal"], ensemble=False)
    assert result.columns == ["single", "equal", "greedy"]
    for n in (1, 3):
        out = tmp_path / f"soup{n}.h5"
        soup(run[-n:], "blobs", out)
        expected = _scores(out, blobs())
        got = result.scores[n - 1]["greedy"]
        assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_bn_columns_are_the_averages_after_bn_update(tmp_path):
    run = digits_run()
    result = evaluate(run, "digits", schemes=["equal"], bn_data="digits", greedy=False)
    assert result.columns == ["single", "equal", "equal+bn", "ensemble"]
    average, updated = tmp_path / "avg.h5", tmp_path / "avg_bn.h5"
    wavg.combine(run[-2:], average)
    bn_update(average, "digits", updated)
    expected = _scores(updated, digits())
    got = result.scores[1]["equal+bn"]
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert got != result.scores[1]["equal"]


def test_without_batchnorm_the_bn_columns_equal_the_averages():
    result = evaluate(short_run(), "blobs", schemes=["exp"], bn_data="blobs", greedy=False)
    for row in result.scores:
        assert row["exp+bn"] == row["exp"]


def test_soup_data_that_is_the_reported_data_file_is_refused(tmp_path):
    data = blobs()
    npz = tmp_path / "data.npz"
    np.savez(
        npz, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test
    )
    code, _, err = run_wavg("evaluate", *short_run(), "--data", npz, "--soup-data", npz)
    assert_one_line_error(code, err, "--soup-data", "held-out", exit_code=2)


def test_user_data_without_soup_data_has_no_greedy_column(tmp_path):
    data = blobs()
    npz = tmp_path / "data.npz"
    np.savez(
        npz, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test
    )
    result = evaluate(short_run()[-2:], npz, schemes=["equal"])
    assert result.columns == ["single", "equal", "ensemble"]
