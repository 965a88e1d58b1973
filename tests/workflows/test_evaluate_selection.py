"""evaluate with the selection flags: row n scores --last n (the average columns) beside
--best n --by METRIC (the best:<average> columns), on a real Keras run's checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.kerasfiles import run_wavg
from support.logged_run import EPOCHS, logged_run

import wavg
from wavg.workflows.data import blobs
from wavg.workflows.evaluate import evaluate
from wavg.workflows.model_loading import import_keras

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return logged_run(tmp_path_factory.mktemp("logged"))


@pytest.fixture(scope="module")
def result(run):
    return evaluate(
        run.files("unlabelled"),
        data="blobs",
        schemes=["equal", "wsm-cosine"],
        ensemble=False,
        greedy=False,
        by="val_loss",
        metrics=run.csv,
    )


def test_best_columns_average_the_n_best_by_the_metric(run, result, tmp_path):
    assert result.columns == ["single", "equal", "wsm-cosine", "best:equal", "best:wsm-cosine"]
    assert result.best_by == "val_loss"
    keras = import_keras()
    data = blobs()
    files = run.files("unlabelled")
    for n in (2, 5):
        plan = wavg.plan_combine(files, best=n, by="val_loss", metrics=run.csv)
        out = tmp_path / f"best{n}.h5"
        wavg.combine(plan.inputs, out, order="given")
        net = keras.models.load_model(out)
        expected = net.evaluate(data.x_test, data.y_test, verbose=0, return_dict=True)
        got = result.scores[n - 1]
        assert got["best:equal"]["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-6)
        # ... and is what evaluate scores for those n files as "the n newest".
        alone = evaluate(plan.inputs, data="blobs", schemes=["equal", "wsm-cosine"],
                         ensemble=False, greedy=False)  # fmt: skip
        assert got["best:equal"] == alone.scores[n - 1]["equal"]
        assert got["best:wsm-cosine"] == alone.scores[n - 1]["wsm-cosine"]
    # All of them, best or newest, is the same average.
    assert result.scores[EPOCHS - 1]["best:equal"] == result.scores[EPOCHS - 1]["equal"]


def test_every_thins_the_rows_first(run):
    thinned = evaluate(
        run.files("unlabelled"), data="blobs", schemes=["equal"], ensemble=False,
        greedy=False, every=3,
    )  # fmt: skip
    assert thinned.epochs == [2, 5, 8]
    assert len(thinned.scores) == 3


def test_the_cli_scores_best_and_last_in_one_table(run):
    code, out, err = run_wavg(
        "evaluate", *run.files("unlabelled"), "--schemes", "equal", "--no-greedy",
        "--no-ensemble", "--by", "val_loss", "--metrics", run.csv, "--max-n", "5", "--json",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["columns"] == ["single", "equal", "best:equal"]
    assert data["best_by"] == "val_loss"
    row = data["rows"][4]  # n = 5: --last 5 beside --best 5 --by val_loss
    assert row["n"] == 5 and set(row["scores"]) == {"single", "equal", "best:equal"}
    assert np.isfinite(row["scores"]["best:equal"]["loss"])
    code, out, err = run_wavg(
        "evaluate", *run.files("unlabelled"), "--schemes", "equal", "--no-greedy",
        "--no-ensemble", "--by", "val_loss", "--metrics", run.csv, "--max-n", "2",
    )  # fmt: skip
    assert code == 0, err
    words = " ".join(out.split())  # the console may wrap the caption
    assert "best:<average> averages the n best by val_loss" in words
