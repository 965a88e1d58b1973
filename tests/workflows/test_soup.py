"""`wavg soup`: the greedy soup on held-out data, on real Keras checkpoints."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.kerasfiles import assert_one_line_error, digits_run, run_wavg, short_run

import wavg
from wavg.workflows.bn_update import bn_update
from wavg.workflows.data import blobs, blobs_validation, digits
from wavg.workflows.model_loading import import_keras
from wavg.workflows.soup import SCHEMA, greedy, rank, soup

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _keras_accuracy(path, x, y) -> float:
    net = import_keras().models.load_model(path)
    return net.evaluate(x, y, verbose=0, return_dict=True)["accuracy"]


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 7), seed=st.integers(0, 2**32 - 1), higher=st.booleans())
def test_the_greedy_soup_never_scores_worse_than_the_best_single(count, seed, higher):
    def score_of(members: frozenset[int]) -> float:
        return random.Random(f"{seed}-{sorted(members)}").random()

    singles = [score_of(frozenset([i])) for i in range(count)]
    ranked = rank(singles, higher)
    kept, steps = greedy(ranked, score_of, higher)
    best = max(singles) if higher else min(singles)
    final = score_of(frozenset(kept))
    assert (final >= best) if higher else (final <= best)
    assert [s.candidate for s in steps] == ranked and steps[0].kept
    assert kept == [s.candidate for s in steps if s.kept]
    kept_scores = [s.score for s in steps if s.kept]
    assert kept_scores == sorted(kept_scores, reverse=not higher)


def test_ties_rank_the_newer_checkpoint_first():
    assert rank([0.5, 0.7, 0.7, 0.1], higher=True) == [2, 1, 0, 3]
    assert rank([0.5, 0.2, 0.2], higher=False) == [2, 1, 0]


def test_the_blobs_validation_split_is_disjoint_from_the_test_points():
    test, validation = blobs(), blobs_validation()
    seen = {tuple(p) for p in np.concatenate([test.x_test, test.x_train])}
    assert len(validation.x_test) == 1000
    assert not seen & {tuple(p) for p in validation.x_test}
    assert validation.y_test.sum(axis=0).min() >= 300  # all three classes, balanced


def test_the_soup_is_combines_average_of_its_ingredients_scored_on_validation(tmp_path):
    run = short_run()
    out = tmp_path / "soup.h5"
    result = soup(run, "blobs", out)
    ingredients = [run[i] for i in result.ingredients]
    reference = tmp_path / "reference.h5"
    wavg.combine(ingredients, reference, order="given")
    assert _sha(out) == _sha(reference)
    validation = blobs_validation()
    assert result.soup_score == pytest.approx(
        _keras_accuracy(out, validation.x_test, validation.y_test), abs=1e-6
    )
    for path, score in zip(run, result.single_scores, strict=True):
        assert score == pytest.approx(
            _keras_accuracy(path, validation.x_test, validation.y_test), abs=1e-6
        )
    assert result.soup_score >= max(result.single_scores)
    assert len(result.steps) == len(run)


def test_steps_go_to_stderr_and_the_json_summary_to_stdout(tmp_path):
    run = short_run()
    code, out, err = run_wavg("soup", *run, "--data", "blobs", "-o", tmp_path / "s.h5", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == SCHEMA and doc["metric"] == "accuracy"
    assert list(doc) == [
        "schema",
        "data",
        "bn_data",
        "metric",
        "higher_is_better",
        "checkpoints",
        "steps",
        "ingredients",
        "soup",
        "uniform",
        "best_single",
        "seconds",
        "warnings",
    ]
    assert [c["path"] for c in doc["checkpoints"]] == [str(p) for p in reversed(run)]
    assert len(doc["steps"]) == len(run) and doc["steps"][0]["kept"]
    assert doc["best_single"]["score"] == max(c["score"] for c in doc["checkpoints"])
    assert set(doc["ingredients"]) <= {str(p) for p in run}
    assert err.count("soup: ") == len(run) and ("kept" in err)


def test_with_bn_data_the_soup_is_written_recalibrated(tmp_path):
    run = digits_run()
    out = tmp_path / "soup.h5"
    result = soup(run, "digits", out, bn_data="digits")
    average = tmp_path / "average.h5"
    wavg.combine([run[i] for i in result.ingredients], average, order="given")
    reference = tmp_path / "reference.h5"
    bn_update(average, "digits", reference)
    assert _sha(out) == _sha(reference)
    validation = digits(validation=True)
    assert result.soup_score == pytest.approx(
        _keras_accuracy(out, validation.x_test, validation.y_test), abs=1e-6
    )


def _lambda_model(tmp_path):
    keras = import_keras()
    net = keras.Sequential(
        [keras.Input((2,)), keras.layers.Lambda(lambda t: t), keras.layers.Dense(3)]
    )
    net.compile(optimizer=keras.optimizers.SGD(name="lambda_sgd"), loss="mse", metrics=["accuracy"])
    path = tmp_path / "model_12.h5"
    net.save(path)
    return path


def test_bad_input_is_one_line_with_nothing_written(tmp_path):
    run = short_run()
    out = tmp_path / "soup.h5"
    no_test = tmp_path / "no_test.npz"
    np.savez(no_test, x_train=np.zeros((3, 2)), y_train=np.zeros((3, 3)))
    wrong = tmp_path / "wrong.npz"
    z = np.zeros((4, 5), dtype="float32")
    np.savez(wrong, x_train=z, y_train=z[:, :3], x_test=z, y_test=z[:, :3])
    cases = [
        (("--data", tmp_path / "none.npz"), 1, "no such data file"),
        (("--data", no_test), 1, "x_test"),
        (("--data", wrong), 1, "expects (2,)"),
        (("--data", "blobs", "--metric", "auc"), 2, "--metric"),
    ]
    for args, exit_code, word in cases:
        code, _, err = run_wavg("soup", *run, *args, "-o", out)
        assert_one_line_error(code, err, word, exit_code=exit_code)
        assert not out.exists()
    code, _, err = run_wavg("soup", "--data", "blobs", "-o", out)
    assert_one_line_error(code, err, "CHECKPOINTS", exit_code=2)
    code, _, err = run_wavg("soup", _lambda_model(tmp_path), "--data", "blobs", "-o", out)
    assert_one_line_error(code, err, "Lambda")
    assert not out.exists() and not list(tmp_path.glob(".soup.h5*"))
