"""evaluate: single checkpoints, weight averages (via wavg.averaging.engine) and the output ensemble."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner
from support.kerasfiles import assert_one_line_error, run_wavg, scratch_dir, short_run

from wavg.averaging.onerun import one_run_warnings
from wavg.cli import cli
from wavg.workflows.data import blobs
from wavg.workflows.evaluate import SCHEMA, evaluate
from wavg.workflows.model_loading import import_keras

# `backend`: `make test` runs these again on JAX (KERAS_BACKEND=jax).
pytestmark = [pytest.mark.backend, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
keras = import_keras()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run():
    return short_run()  # 12 epochs, model_8.h5 ... model_11.h5


@pytest.fixture(scope="module")
def result(run):
    return evaluate(run, data="blobs", alphas=[0.5])


def test_a_one_member_average_scores_exactly_like_the_newest_checkpoint(result):
    first = result.scores[0]
    for column in ("equal", "linear", "exp", "exp(a=0.5)", "greedy", "ensemble"):
        assert first[column] == first["single"], column


def test_single_column_matches_keras_evaluate(run, result):
    data = blobs()
    for n in (1, 3):
        net = keras.models.load_model(run[-n])
        expected = net.evaluate(data.x_test, data.y_test, verbose=0, return_dict=True)
        got = result.scores[n - 1]["single"]
        assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_ensemble_column_is_the_mean_of_independently_computed_predictions(run, result):
    data = blobs()
    predictions = [keras.models.load_model(p).predict(data.x_test, verbose=0) for p in run[-3:]]
    mean = np.mean(predictions, axis=0).astype(np.float64)
    accuracy = np.mean(mean.argmax(axis=1) == data.y_test.argmax(axis=1))
    clipped = np.clip(mean, 1e-7, 1 - 1e-7)
    loss = -np.mean(np.sum(data.y_test * np.log(clipped / clipped.sum(1, keepdims=True)), axis=1))
    assert result.scores[2]["ensemble"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result.scores[2]["ensemble"]["loss"] == pytest.approx(loss, rel=1e-4)


def test_averages_are_made_by_combine_and_differ_from_single_checkpoints(run, result):
    import wavg

    out = scratch_dir("wavg-avg-") / "avg.h5"
    wavg.combine(run, out, scheme="linear")
    net = keras.models.load_model(out)
    data = blobs()
    expected = net.evaluate(data.x_test, data.y_test, verbose=0, return_dict=True)
    assert result.scores[-1]["linear"]["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_columns_and_order_follow_the_schemes_and_alphas(result):
    assert result.columns == [
        "single",
        "equal",
        "linear",
        "exp",
        "exp(a=0.5)",
        "greedy",
        "ensemble",
    ]
    assert [p.name for p in result.checkpoints] == [p.name for p in short_run()]
    assert result.epochs == [8, 9, 10, 11]
    assert result.primary_metric == "accuracy"


def test_json_output_has_a_stable_schema(run):
    code, out, err = run_wavg("evaluate", *run, "--max-n", 2, "--schemes", "equal", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert list(doc) == [
        "schema",
        "data",
        "metrics",
        "primary_metric",
        "higher_is_better",
        "columns",
        "checkpoints",
        "rows",
        "best",
        "warnings",
    ]
    assert doc["schema"] == SCHEMA
    assert doc["columns"] == ["single", "equal", "greedy", "ensemble"]
    assert doc["metrics"] == ["loss", "accuracy"]
    assert doc["checkpoints"] == [str(run[-1]), str(run[-2])]  # newest first
    assert [list(row) for row in doc["rows"]] == [["n", "checkpoint", "epoch", "scores"]] * 2
    assert doc["rows"][0]["epoch"] == 11 and doc["rows"][1]["n"] == 2
    assert set(doc["rows"][0]["scores"]["equal"]) == {"loss", "accuracy"}
    assert set(doc["best"]["single"]) == {"n", "value"}


def test_csv_output_has_one_score_per_line(run):
    code, out, err = run_wavg("evaluate", *run, "--max-n", 2, "--schemes", "exp", "--csv")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "n,epoch,checkpoint,column,metric,value"
    assert len(lines) == 1 + 2 * 4 * 2  # n x (single, exp, greedy, ensemble) x (loss, accuracy)
    assert lines[1].startswith(f"1,11,{run[-1]},single,loss,")


def test_table_marks_and_plot_is_a_valid_png(run, tmp_path):
    plot = tmp_path / "evaluate.png"
    result = CliRunner().invoke(cli, ["evaluate", *map(str, run), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "test accuracy on blobs" in result.stdout
    assert "ensemble" in result.stdout and "epoch" in result.stdout
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(plot)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_a_regression_model_compiled_with_mae_is_scored_with_its_loss(tmp_path):
    from wavg.workflows.train import train_save

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.1).astype("float32")[:, None]
    data = tmp_path / "reg.npz"
    np.savez(data, x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    arch = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    arch.compile(optimizer="adam", loss="mae")
    arch.save(tmp_path / "arch.keras")
    files = train_save(
        tmp_path / "ckpt", epochs=5, keep=3, seed=2, fmt="keras", data=data,
        model=tmp_path / "arch.keras",
    ).files  # fmt: skip
    result = evaluate(files, data=data, schemes=["equal"])
    assert result.metrics == ["loss"] and result.primary_metric == "loss"
    mae = np.mean(np.abs(keras.models.load_model(files[-1]).predict(x[40:], verbose=0) - y[40:]))
    assert result.scores[0]["single"]["loss"] == pytest.approx(mae, rel=1e-5)
    n, best = result.best("equal")
    assert best == min(row["equal"]["loss"] for row in result.scores)
    assert result.to_dict()["higher_is_better"] is False


def test_weights_only_checkpoints_are_evaluated_with_a_model_file(tmp_path):
    files = short_run(fmt="weights.h5")
    arch = tmp_path / "arch.keras"
    keras.models.load_model(short_run()[-1]).save(arch)
    code, _, err = run_wavg("evaluate", *files[-2:], "--model", arch, "--json")
    assert code == 0, err


def test_checkpoints_from_separate_runs_trigger_the_one_run_warning(tmp_path):
    a, b = short_run(seed=1)[-1], short_run(seed=5)[-1]
    shutil.copy(a, tmp_path / "model_1.h5")
    shutil.copy(b, tmp_path / "model_2.h5")
    code, _, err = run_wavg(
        "evaluate", tmp_path / "model_1.h5", tmp_path / "model_2.h5", "--schemes", "equal"
    )
    assert code == 0
    assert "wavg: warning: the checkpoints differ by up to" in err


def test_one_runs_last_epochs_raise_no_warning(result):
    assert result.warnings == []


def test_a_jump_in_the_middle_of_the_list_is_reported():
    start = np.random.default_rng(0).normal(size=1000)
    vectors = [start + 0.001 * k for k in range(4)] + [start + 0.2 + 0.001 * k for k in range(4)]
    found = one_run_warnings(vectors, [Path(f"model_{k}.h5") for k in range(8)])
    assert len(found) == 1 and "model_3.h5 to model_4.h5" in found[0]


def test_weights_only_files_without_a_model_fail_in_one_line():
    code, _, err = run_wavg("evaluate", *short_run(fmt="weights.h5"))
    assert_one_line_error(code, err, "weights-only", "--model FILE.keras")


def test_a_file_that_is_not_a_model_fails_in_one_line(tmp_path):
    bad = tmp_path / "model_1.h5"
    bad.write_text("not hdf5")
    code, _, err = run_wavg("evaluate", bad)
    assert_one_line_error(code, err, "model_1.h5")


def test_a_plot_path_in_a_missing_directory_fails_before_any_work(run, tmp_path):
    code, _, err = run_wavg("evaluate", *run, "--plot", tmp_path / "no" / "p.png")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_wavg("evaluate", *run, "--plot", tmp_path)
    assert_one_line_error(code, err, "is a directory")


def test_missing_or_invalid_data_fails_in_one_line(run, tmp_path):
    code, _, err = run_wavg("evaluate", *run, "--data", tmp_path / "none.npz")
    assert_one_line_error(code, err, "none.npz")
    wrong = tmp_path / "wrong.npz"
    z = np.zeros((4, 5), dtype="float32")
    np.savez(wrong, x_train=z, y_train=z[:, :3], x_test=z, y_test=z[:, :3])
    code, _, err = run_wavg("evaluate", *run, "--data", wrong)
    assert_one_line_error(code, err, "wrong.npz", "expects (2,)")


@pytest.mark.parametrize(
    "args",
    [
        ("--max-n", "9"),
        ("--json", "--csv"),
        ("--schemes", "median"),
        ("--alphas", "1,x"),
        ("--alphas", "-1"),
    ],
)
def test_bad_options_are_usage_errors(run, args):
    code, _, err = run_wavg("evaluate", *run, *args)
    assert_one_line_error(code, err, exit_code=2)


def test_a_checkpoint_linking_outside_itself_is_refused_before_keras_reads_it(run, tmp_path):
    import h5py

    linked = tmp_path / "model_11.h5"
    shutil.copy(run[-1], linked)
    with h5py.File(linked, "r+") as f:
        f["model_weights/extra"] = h5py.ExternalLink("/etc/passwd", "/x")
    code, _, err = run_wavg("evaluate", run[-2], linked)
    assert_one_line_error(code, err, "external link")
