"""`wavg combine` through Click's CliRunner: output streams, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from support.reference import SAMPLES

from wavg.cli import cli

JSON_KEYS = {
    "inputs",
    "scheme",
    "alpha",
    "output",
    "format",
    "tensors",
    "copied_tensors",
    "requantized_layers",
    "bytes_read",
    "bytes_written",
    "seconds",
    "dry_run",
    "dropped_optimizer",
    "warnings",
    "bytes_fetched",
    "requests",
}


@pytest.fixture
def samples(tmp_path):
    """A private copy of the ten case-study checkpoints (so tests may damage them)."""
    directory = tmp_path / "ckpt"
    shutil.copytree(SAMPLES, directory)
    return sorted(directory.glob("model_49*.h5"))


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wavg: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_combine_writes_the_output_and_reports_on_stdout(samples, tmp_path):
    out = tmp_path / "avg.h5"
    result = invoke("combine", "--scheme", "exp", "--alpha", "2", *samples, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out} (h5, 4 tensors averaged")
    assert "model_499.h5 (newest)" in result.stderr and "0.3961" in result.stderr
    with h5py.File(out) as f:
        assert "model_weights" in f


def test_the_plan_in_a_log_is_plain_aligned_text(samples, tmp_path):
    """Not a terminal (CI logs, pipes): no box drawing, one row per input, and every
    warning on one line, whatever its length."""
    many = [tmp_path / f"model_{100 + i}.h5" for i in range(len(samples))]
    for copy, sample in zip(many, samples, strict=True):
        shutil.copy(sample, copy)
    result = invoke("combine", "--scheme", "linear", *many, "-o", tmp_path / "avg.h5")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == "wavg combine: linear"
    assert lines[1].split() == ["#", "checkpoint", "epoch", "weight"]
    rows = [line.split() for line in lines[2 : 2 + len(many)]]
    assert [row[1] for row in rows] == [p.name for p in many[:-1]] + [many[-1].name]
    assert rows[-1][2] == "(newest)" and rows[-1][3] == str(100 + len(many) - 1)
    weights = [float(row[-1]) for row in rows]
    assert weights == sorted(weights) and abs(sum(weights) - 1) < 1e-3
    assert lines[2 + len(many)] == f"in {tmp_path}"
    assert not set("┏━┃│└┡") & set(result.stderr)
    # Copies of one file are 0% apart: no one-run warning; any warning would be one line.
    assert all(line.startswith("wavg: warning: ") for line in lines[3 + len(many) :])


def test_json_summary_has_a_stable_schema(samples, tmp_path):
    out = tmp_path / "avg.h5"
    result = invoke("combine", "--json", "--scheme", "linear", "--last", "3", *samples, "-o", out)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == JSON_KEYS
    assert [i["epoch"] for i in data["inputs"]] == [497, 498, 499]
    assert [round(i["weight"], 6) for i in data["inputs"]] == [0.166667, 0.333333, 0.5]
    assert data["format"] == "h5" and data["tensors"] == 4 and data["dry_run"] is False
    assert data["bytes_fetched"] == 0 and data["requests"] == 0  # local inputs fetch nothing
    assert data["bytes_written"] == out.stat().st_size


def test_dry_run_prints_the_plan_and_writes_nothing(samples, tmp_path):
    out = tmp_path / "avg.h5"
    result = invoke("combine", "--dry-run", *samples, "-o", out)
    assert result.exit_code == 0, result.output
    assert "nothing written" in result.stdout
    assert "model_490.h5" in result.stderr
    assert not out.exists()


def test_given_order_makes_the_last_argument_the_newest(samples, tmp_path):
    out = tmp_path / "avg.h5"
    reordered = [samples[5], samples[0]]
    result = invoke(
        "combine", "--json", "--order", "given", "--weights", "1,3", *reordered, "-o", out
    )
    data = json.loads(result.stdout)
    assert [i["path"] for i in data["inputs"]] == [str(p) for p in reordered]
    assert [i["weight"] for i in data["inputs"]] == [0.25, 0.75]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--scheme", "linear", "--weights", "1,2"], ["either --scheme or --weights"]),
        (["--scheme", "linear", "--alpha", "2"], ["--alpha applies only to --scheme exp"]),
        (["--scheme", "exp", "--alpha", "0"], ["--alpha must be a positive number"]),
        (["--weights", "1,2"], ["got 2 weights for 10 checkpoints"]),
        (["--weights", "1,x,1,1,1,1,1,1,1,1"], ["'x' is not a number"]),
        (["--weights", "-1,1,1,1,1,1,1,1,1,1"], ["negative"]),
        (["--weights", "0,0,0,0,0,0,0,0,0,0"], ["must not all be zero"]),
        (["--last", "11"], ["--last 11 asks for more"]),
        (["--last", "0"], ["--last"]),
        (["--scheme", "cosine"], ["--scheme"]),
    ],
)
def test_usage_errors_exit_2_with_one_line(samples, tmp_path, args, fragments):
    out = tmp_path / "avg.h5"
    result = invoke("combine", *args, *samples, "-o", out)
    assert_one_line_error(result, 2, *fragments)
    assert not out.exists()


def test_missing_output_option_is_a_usage_error(samples):
    assert_one_line_error(invoke("combine", *samples), 2, "--output")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda p: p.unlink(), "no such file"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"\x00" * 4096), "not a Keras checkpoint"),
        (lambda p: p.write_bytes(p.read_bytes()[:3000]), "model_495.h5"),
        (lambda p: (p.unlink(), p.mkdir()), "directory"),
    ],
    ids=["missing", "empty", "zeros", "truncated", "directory"],
)
def test_bad_inputs_exit_1_naming_the_file(samples, tmp_path, damage, fragment):
    damage(samples[5])
    out = tmp_path / "avg.h5"
    result = invoke("combine", *samples, "-o", out)
    assert_one_line_error(result, 1, "model_495.h5", fragment)
    assert not out.exists()
    assert not list(tmp_path.glob(".avg.h5.wavg-tmp-*"))


def test_mixed_architectures_name_the_tensor_and_both_files(samples, tmp_path):
    with h5py.File(samples[2], "r+") as f:
        name = "model_weights/classes/case_study/classes/bias"
        del f[name]
        f.create_dataset(name, data=np.zeros(4, np.float32))
    result = invoke("combine", *samples, "-o", tmp_path / "avg.h5")
    assert_one_line_error(result, 1, "model_492.h5", "classes/bias", "model_499.h5", "shape (4,)")


def test_missing_output_directory_is_refused_before_reading(samples, tmp_path):
    result = invoke("combine", *samples, "-o", tmp_path / "nowhere" / "avg.h5")
    assert_one_line_error(result, 1, "does not exist")


def test_an_existing_output_is_replaced_whole(samples, tmp_path):
    out = tmp_path / "avg.h5"
    out.write_bytes(b"old")
    assert invoke("combine", *samples, "-o", out).exit_code == 0
    assert out.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg.h5", "ckpt"]


def test_help_documents_every_option():
    result = invoke("combine", "--help")
    assert result.exit_code == 0
    for option in (
        "--scheme",
        "--alpha",
        "--weights",
        "--last",
        "--order",
        "--dry-run",
        "--json",
        "--allow-nonfinite",
        "--drop-optimizer",
        "--output",
    ):
        assert option in result.stdout
