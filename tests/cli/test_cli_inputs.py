"""What `wavg combine` says about inputs a new user gives by mistake (issue 22): a folder of
checkpoints, one file of another format, a single file, more --last than files, a text file.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from support.reference import SAMPLES

from wavg.cli import cli
from wavg.errors import CheckpointError
from wavg.formats.registry import expand_checkpoint_dirs


@pytest.fixture
def ckpt(tmp_path):
    """A private copy of the ten case-study checkpoints in a folder named ckpt."""
    shutil.copytree(SAMPLES, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wavg: error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("extra", [[], ["--order", "given"]], ids=["natural", "given"])
def test_a_folder_of_checkpoints_is_refused_with_the_glob_that_names_them(ckpt, tmp_path, extra):
    result = invoke("combine", ckpt, "--last", "3", "-o", tmp_path / "avg.h5", *extra)
    line = one_error_line(result, 1)
    assert line == (
        f"wavg: error: {ckpt}: is a directory, not a checkpoint file; "
        f"it holds 10 .h5 files: pass '{ckpt}/*.h5'"
    )
    assert not (tmp_path / "avg.h5").exists()
    suggested = line.rsplit("pass ", 1)[1].strip("'")
    done = invoke("combine", suggested, "--last", "3", "-o", tmp_path / "avg.h5", *extra)
    assert done.exit_code == 0, done.output


def test_a_folder_of_model_folders_or_of_nothing_says_so(tmp_path):
    run = tmp_path / "run"
    for name in ("ep1", "ep2"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")  # what makes a folder a model for Keras
    with pytest.raises(CheckpointError, match=rf"it holds 2 model folders: pass '{run}/\*/'"):
        expand_checkpoint_dirs([run])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: is a directory.*it holds no checkpoint"):
        expand_checkpoint_dirs([tmp_path / "empty"])


def test_one_input_of_another_format_is_the_one_named(ckpt, tmp_path, kf):
    odd = shutil.copy(kf / "keras" / "model_3.keras", ckpt / "model_500.keras")
    line = one_error_line(invoke("combine", f"{ckpt}/model_*", "-o", tmp_path / "a.h5"), 1)
    assert line == (
        f"wavg: error: {odd}: is in keras format but the other 10 inputs are in h5 format; "
        "all inputs must share one format"
    )
    older = shutil.copy(kf / "keras" / "model_3.keras", tmp_path / "model_1.keras")
    line = one_error_line(
        invoke("combine", older, *sorted(ckpt.glob("*.h5"))[:2], "-o", tmp_path / "a.h5"), 1
    )
    assert f"{older}: is in keras format but the other 2 inputs are in h5 format" in line


def test_of_two_inputs_in_two_formats_the_older_is_named(ckpt, tmp_path, kf):
    older = shutil.copy(kf / "keras" / "model_3.keras", tmp_path / "model_1.keras")
    newest = ckpt / "model_499.h5"
    line = one_error_line(invoke("combine", older, newest, "-o", tmp_path / "a.h5"), 1)
    assert f"{older}: is in keras format but the other input, {newest}, is in h5 format" in line


def test_a_single_input_is_copied_with_a_note(ckpt, tmp_path):
    out = tmp_path / "one.h5"
    result = invoke("combine", ckpt / "model_499.h5", "-o", out)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("wavg: note: ")]
    assert notes == [
        f"wavg: note: one checkpoint given: {out} holds the weights of {ckpt}/model_499.h5 "
        "unchanged; pass two or more to average them"
    ]
    name = "model_weights/classes/case_study/classes/kernel"
    with h5py.File(out) as got, h5py.File(ckpt / "model_499.h5") as given:
        np.testing.assert_array_equal(got[name][()], given[name][()])
    quiet = invoke("combine", ckpt / "model_499.h5", "-o", out, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_more_last_than_inputs_is_refused_with_the_fix(ckpt, tmp_path):
    line = one_error_line(
        invoke("combine", f"{ckpt}/*.h5", "--last", "20", "-o", tmp_path / "a.h5"), 2
    )
    assert line.endswith(
        "--last 20 asks for more checkpoints than the 10 given; pass --last 10 or fewer, "
        "or leave --last out to average all of them"
    )


def test_a_tiny_text_file_is_not_called_truncated(tmp_path):
    text = tmp_path / "model_1.h5"
    text.write_text("hi\n")
    line = one_error_line(invoke("combine", text, "-o", tmp_path / "a.h5"), 1)
    assert line == (
        f"wavg: error: {text}: too short to be a checkpoint (3 bytes, neither HDF5 nor a "
        ".keras archive nor a .weights.json index)"
    )
    text.write_bytes(b"\x89HDF")  # the start of an HDF5 file: cut short
    assert "(truncated?)" in one_error_line(invoke("combine", text, "-o", tmp_path / "a.h5"), 1)
