"""Choosing inputs from the training record (--best/--by, --every, metrics files and names)
on a real Keras run, against a numpy reference computed from the CSV Keras wrote."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from support.logged_run import EPOCHS, logged_run

import wavg
from wavg.averaging.metrics import value_in_name
from wavg.errors import MetricsError, UsageError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return logged_run(tmp_path_factory.mktemp("logged"))


def reference_best(values: np.ndarray, n: int, lower: bool) -> list[int]:
    """0-based positions of the n best, ties to the newer, returned in epoch order."""
    key = values if lower else -values
    ranked = np.lexsort((-np.arange(len(values)), key))  # by value, then newest first
    return sorted(ranked[:n].tolist())


def names(plan) -> list[str]:
    return [p.name for p in plan.inputs]


@pytest.mark.parametrize(
    ("by", "column", "lower"),
    [
        ("val_loss", "val_loss", True),  # inferred: loss -> min
        ("val_accuracy", "val_accuracy", False),  # inferred: max (it has ties)
        ("val_loss:max", "val_loss", False),  # explicit
        ("val_accuracy:min", "val_accuracy", True),
    ],
)
@pytest.mark.parametrize("n", [1, 3, 5])
def test_best_from_the_csv_matches_the_numpy_reference(run, by, column, lower, n):
    rows = run.rows()
    values = np.array([rows[e][column] for e in range(EPOCHS)])
    files = run.files("plain")
    plan = wavg.plan_combine(files, best=n, by=by, metrics=run.csv)
    assert names(plan) == [files[i].name for i in reference_best(values, n, lower)]
    assert plan.values == [values[i] for i in reference_best(values, n, lower)]
    assert plan.metric == column


def test_the_history_json_picks_what_the_csv_picks(run):
    files = run.files("plain")
    for by in ("val_loss", "val_accuracy", "loss"):
        from_csv = wavg.plan_combine(files, best=3, by=by, metrics=run.csv)
        from_json = wavg.plan_combine(files, best=3, by=by, metrics=run.history)
        assert names(from_json) == names(from_csv)
        assert from_json.values == pytest.approx(from_csv.values, rel=1e-15)


@pytest.mark.parametrize("template", ["unlabelled", "labelled"])
def test_best_from_the_names_matches_the_rounded_logged_values(run, template):
    rows = run.rows()
    rounded = np.array([round(rows[e]["val_loss"], 4) for e in range(EPOCHS)])
    files = run.files(template)
    plan = wavg.plan_combine(files, best=3, by="val_loss")
    assert names(plan) == [files[i].name for i in reference_best(rounded, 3, True)]
    assert plan.values == [rounded[i] for i in reference_best(rounded, 3, True)]


def test_a_labelled_name_gives_each_metric_its_own_value(run):
    rows = run.rows()
    files = run.files("labelled")
    plan = wavg.plan_combine(files, best=2, by="val_accuracy")
    rounded = np.array([round(rows[e]["val_accuracy"], 4) for e in range(EPOCHS)])
    assert names(plan) == [files[i].name for i in reference_best(rounded, 2, False)]
    with pytest.raises(MetricsError, match="no loss value in its name"):
        wavg.plan_combine(files, best=2, by="loss")  # "loss" is not val_loss


def test_ties_rank_the_newer_epoch_first(run, tmp_path):
    files = run.files("plain")
    rows = run.rows()
    tied = tmp_path / "tied.csv"
    with tied.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "val_loss"])
        for epoch in range(EPOCHS):
            writer.writerow([epoch, 0.5 if epoch in (1, 3, 4) else rows[epoch]["val_loss"] + 1])
    plan = wavg.plan_combine(files, best=2, by="val_loss", metrics=tied)
    assert names(plan) == [files[3].name, files[4].name]  # epochs 4 and 5 (rows 3 and 4)
    accuracy = np.array([rows[e]["val_accuracy"] for e in range(EPOCHS)])
    assert len(set(accuracy)) < EPOCHS  # Keras' own ties
    plan = wavg.plan_combine(files, best=4, by="val_accuracy", metrics=run.csv)
    assert names(plan) == [files[i].name for i in reference_best(accuracy, 4, False)]


def test_epoch_base_zero_matches_row_e(run):
    files = run.files("plain")
    with pytest.raises(MetricsError, match=f"{files[-1].name}: no row for epoch {EPOCHS}"):
        wavg.plan_combine(files, best=2, by="val_loss", metrics=run.csv, metrics_epoch_base=0)
    rows = run.rows()
    plan = wavg.plan_combine(
        files[:-1], last=2, by="val_loss", metrics=run.csv, metrics_epoch_base=0
    )
    assert plan.values == [rows[e]["val_loss"] for e in (EPOCHS - 2, EPOCHS - 1)]


@pytest.mark.parametrize("problem", ["missing", "nan"])
def test_a_missing_or_nan_value_is_refused_naming_the_file(run, tmp_path, problem):
    files = run.files("plain")
    broken = tmp_path / "log.csv"
    lines = run.csv.read_text().splitlines()
    if problem == "missing":
        del lines[3]  # the row of epoch 2 (the file of epoch 3)
    else:
        cells = lines[3].split(",")
        cells[-1] = "nan"
        lines[3] = ",".join(cells)
    broken.write_text("\n".join(lines) + "\n")
    expected = "no row for epoch 3" if problem == "missing" else "val_loss is NaN"
    with pytest.raises(MetricsError, match=expected) as caught:
        wavg.plan_combine(files, best=2, by="val_loss", metrics=broken)
    assert str(files[2]) in str(caught.value)


def test_nan_in_a_history_json_is_refused(run, tmp_path):
    history = json.loads(run.history.read_text())
    history["val_loss"][5] = math.nan
    path = tmp_path / "history.json"
    path.write_text(json.dumps(history))
    files = run.files("plain")
    with pytest.raises(MetricsError, match=f"{files[5].name}: val_loss is NaN"):
        wavg.plan_combine(files, best=2, by="val_loss", metrics=path)


def test_names_without_values_are_refused_without_a_metrics_file(run):
    files = run.files("plain")
    with pytest.raises(MetricsError, match=f"{files[0].name}: no val_loss value in its name"):
        wavg.plan_combine(files, best=2, by="val_loss")


def test_two_unlabelled_values_in_a_name_are_ambiguous(run):
    files = run.files("ambiguous")
    with pytest.raises(MetricsError, match="2 unlabelled values") as caught:
        wavg.plan_combine(files, best=2, by="val_loss")
    assert str(files[0]) in str(caught.value)
    plan = wavg.plan_combine(files, best=2, by="val_loss", metrics=run.csv)  # the file decides
    assert len(plan.inputs) == 2


def test_every_counts_back_from_the_newest_before_last_and_best(run):
    files = run.files("unlabelled")  # epochs 1..8
    assert [e for e in wavg.plan_combine(files, every=3).epochs] == [2, 5, 8]
    assert wavg.plan_combine(files, every=3, last=2).epochs == [5, 8]
    rows = run.rows()
    spaced = [1, 3, 5, 7]  # rows of epochs 2, 4, 6, 8
    values = np.array([rows[r]["val_loss"] for r in spaced])
    plan = wavg.plan_combine(files, every=2, best=2, by="val_loss", metrics=run.csv)
    assert plan.epochs == [spaced[i] + 1 for i in reference_best(values, 2, True)]
    with pytest.raises(UsageError, match="--last 4 asks for more checkpoints than the 3 kept"):
        wavg.plan_combine(files, every=3, last=4)


def test_requests_that_cannot_select_are_usage_errors(run):
    files = run.files("plain")
    for kwargs, message in [
        ({"best": 2}, "--best needs --by"),
        ({"best": 2, "last": 2, "by": "val_loss"}, "not both"),
        ({"metrics": run.csv}, "--metrics needs --by"),
        ({"best": 2, "by": "val_loss:up"}, "METRIC:min or METRIC:max"),
    ]:
        with pytest.raises(UsageError, match=message):
            wavg.plan_combine(files, **kwargs)


@pytest.mark.parametrize(
    ("stem", "metric", "value"),
    [
        ("model.05-0.4312", "val_loss", 0.4312),
        ("model.05--0.4312", "val_loss", -0.4312),
        ("model.05-val_loss=0.43", "val_loss", 0.43),
        ("model.05-val_loss=0.43-loss=0.5", "loss", 0.5),
        ("model.05-val_loss=0.43", "loss", None),
        ("model.05", "val_loss", None),
        ("model.05-nan", "val_loss", math.nan),
    ],
)
def test_how_names_are_read(stem, metric, value):
    found = value_in_name(stem, metric)
    if value is None or found is None:
        assert found is value
    elif math.isnan(value):
        assert math.isnan(found)
    else:
        assert found == value
