"""Unzipped ``.keras`` folders (``model.save(dir, zipped=False)``), averaged into a folder.

The output folder loads with ``keras.models.load_model``, equals the numpy reference, keeps
the newest's config and metadata byte for byte, and replaces a previous output folder in one
swap: after ``kill -9`` at any moment the path holds the previous folder or the complete new
one, also where the file system cannot swap two folders atomically.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest
from support import multifile as hm
from support import safety as hs

import wavg
from wavg.storage.local_target import clean_folder_leftovers

KILL_TRIALS = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> hm.MultiRun:
    return hm.multi_run(tmp_path_factory.mktemp("multi"))


def test_folders_average_to_the_reference_and_keras_loads_the_output_folder(run, tmp_path):
    out = tmp_path / "avg"
    with hs.inputs_untouched([p for f in run.folders for p in f.iterdir()]):
        summary = wavg.combine(run.folders, out)
    assert summary.format == "keras folder" and summary.tensors == 10
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in run.folders[-1].iterdir()
    )
    for name in ("config.json", "metadata.json"):
        assert (out / name).read_bytes() == (run.folders[-1] / name).read_bytes()
    hm.assert_weights_equal(hm.load_weights_into_model(out), run.reference)
    assert [p.name for p in tmp_path.iterdir()] == ["avg"]


def test_a_previous_output_folder_is_replaced_whole(run, tmp_path):
    out = tmp_path / "avg"
    shutil.copytree(run.folders[0], out)  # a previous output, written by Keras
    (out / "assets" / "stale.txt").write_text("from the previous model")
    wavg.combine(run.folders, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in run.folders[-1].iterdir()
    )
    assert list((out / "assets").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["avg"]
    hm.assert_weights_equal(hm.load_weights_into_model(out), run.reference)


def test_assets_of_the_newest_folder_are_copied_byte_for_byte(run, tmp_path):
    inputs = [shutil.copytree(f, tmp_path / f.name) for f in run.folders]
    (inputs[-1] / "assets" / "vocab").mkdir(parents=True, exist_ok=True)
    (inputs[-1] / "assets" / "vocab" / "words.txt").write_bytes(b"alpha\nbeta\n")
    out = tmp_path / "avg"
    wavg.combine(inputs, out)
    assert (out / "assets" / "vocab" / "words.txt").read_bytes() == b"alpha\nbeta\n"


@pytest.mark.parametrize("kind", ["notes", "file"])
def test_an_output_path_that_is_not_a_model_folder_is_never_replaced(kind, run, tmp_path, capfd):
    out = tmp_path / "avg"
    if kind == "notes":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("mine")
    result = hs.run_cli(["combine", *run.folders, "-o", out], capfd)
    hs.assert_one_line_error(result, [out])
    assert (out / "notes.txt" if kind == "notes" else out).read_text() == "mine"
    assert hs.leftovers(tmp_path) == []


def _damage(kind: str, folder: Path, outside: Path) -> list[str]:
    if kind == "no_weights":
        (folder / "model.weights.h5").unlink()
        return ["no model.weights.h5"]
    if kind == "symlink_out":
        secret = outside / "secret.json"
        secret.write_text("{}")
        (folder / "config.json").unlink()
        (folder / "config.json").symlink_to(secret)
        return ["config.json", "symlink"]
    if kind == "fifo":
        (folder / "assets").mkdir(exist_ok=True)
        os.mkfifo(folder / "assets" / "pipe")
        return ["assets/pipe", "not a regular file"]
    if kind == "weights_not_hdf5":
        (folder / "model.weights.h5").write_bytes(b"\0" * 2048)
        return ["HDF5"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no_weights", "symlink_out", "fifo", "weights_not_hdf5"])
def test_a_bad_input_folder_is_refused_in_one_line_naming_it(kind, run, tmp_path, capfd):
    outside = tmp_path / "outside"
    outside.mkdir()
    inputs = [shutil.copytree(f, tmp_path / f.name) for f in run.folders]
    words = _damage(kind, inputs[-1], outside)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = hs.run_cli(["combine", *inputs, "-o", out_dir / "avg"], capfd)
    line = hs.assert_one_line_error(result, [inputs[-1]])
    for word in words:
        assert word in line, line
    assert list(out_dir.iterdir()) == []


def test_a_folder_and_a_keras_archive_are_not_mixed(run, tmp_path, capfd):
    import keras

    archive = tmp_path / "ep9.keras"
    hm.build_model(keras).save(archive)
    result = hs.run_cli(["combine", run.folders[0], archive, "-o", tmp_path / "a.keras"], capfd)
    hs.assert_one_line_error(result, [run.folders[0], "format"])


def test_kill_9_at_random_moments_leaves_the_previous_folder_or_the_complete_new_one(run, tmp_path):
    out = tmp_path / "avg"
    shutil.copytree(run.folders[0], out)
    rng = random.Random(11)
    outcomes = {"previous": 0, "complete": 0}
    for trial in range(KILL_TRIALS):
        before = hm.folder_state(out)
        proc = hm.start_combine(run.folders, out)
        if trial % 2:
            time.sleep(rng.uniform(0.0, 1.0))
        elif hm.wait_until_writing(tmp_path, proc):
            time.sleep(rng.uniform(0.0, 0.6))
        hm.terminate(proc)
        state = hm.folder_state(out)
        if state != before:
            hm.assert_weights_equal(hm.load_weights_into_model(out), run.reference)
        outcomes["previous" if state == before else "complete"] += 1
    result = hs.run_wavg(["combine", *run.folders, "-o", out])
    assert result.code == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["avg"]
    assert outcomes["previous"] > 0
    print(f"kill -9 trials on a folder output: {outcomes}")


@pytest.mark.parametrize("swap", ["exchange", "two_renames"])
def test_dying_before_each_step_leaves_the_previous_folder_or_the_new_one(swap, run, tmp_path):
    out = tmp_path / "avg"
    shutil.copytree(run.folders[0], out)
    env = {**os.environ, "WAVG_TEST_NO_EXCHANGE": "1" if swap == "two_renames" else ""}
    outcomes = {"previous": 0, "complete": 0}
    step = 0
    while True:
        step += 1
        before = hm.folder_state(out) if out.exists() else None
        proc = hm.run_dying_at(step, run.folders, out, env=env)
        if proc.returncode == 0:
            break
        assert proc.returncode == 137, proc.stderr
        if not out.exists():
            # Only between the two renames of a file system that cannot swap: the next
            # run puts the previous folder back before anything else.
            assert swap == "two_renames"
            clean_folder_leftovers(out)
        state = hm.folder_state(out)
        if state != before:
            hm.assert_weights_equal(hm.load_weights_into_model(out), run.reference)
        outcomes["previous" if state == before else "complete"] += 1
    assert outcomes["previous"] > 3 and outcomes["complete"] > 0, outcomes
    result = hs.run_wavg(["combine", *run.folders, "-o", out])
    assert result.code == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["avg"]
    hm.assert_weights_equal(hm.load_weights_into_model(out), run.reference)
    print(f"{swap}: died before each of {step} steps: {outcomes}")


def test_an_output_folder_named_like_an_archive_is_a_usage_error(run, tmp_path, capfd):
    result = hs.run_cli(["combine", *run.folders, "-o", tmp_path / "avg.keras"], capfd)
    hs.assert_one_line_error(result, [".keras"], code=2)
    assert list(tmp_path.iterdir()) == []
