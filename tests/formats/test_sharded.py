"""Sharded weights (``m.weights.json`` and its shards), written by Keras, averaged by wavg.

Inputs are sharded differently (three ``max_shard_size`` values); the output is sharded like
the newest, loads with ``model.load_weights``, and equals the numpy reference. Bad indexes
are refused in one line with nothing written, and ``kill -9`` at random moments leaves the
previous output or the complete new one, never a mix.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import multifile as hm
from support import safety as hs

import wavg
from wavg.errors import InputChanged
from wavg.formats.sharded.commit import placeholder_bytes

KILL_TRIALS = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> hm.MultiRun:
    return hm.multi_run(tmp_path_factory.mktemp("multi"))


def copy_run(run: hm.MultiRun, directory: Path) -> list[Path]:
    """The sharded checkpoints copied into `directory` (for tests that damage them)."""
    for index in run.sharded:
        shutil.copy(index, directory / index.name)
        for name in hm.shard_names(index):
            shutil.copy(index.parent / name, directory / name)
    return [directory / index.name for index in run.sharded]


def test_inputs_sharded_differently_average_to_the_reference_and_keras_loads_the_output(
    run, tmp_path
):
    out = tmp_path / "avg.weights.json"
    with hs.inputs_untouched(run.directory.iterdir()):
        summary = wavg.combine(run.sharded, out)
    assert summary.format == "weights.json" and summary.tensors == 10
    # Sharded like the newest input: the same groups in the same number of shards.
    newest = json.loads(run.sharded[-1].read_text())["weight_map"]
    written = json.loads(out.read_text())["weight_map"]
    assert list(written) == list(newest)
    assert len(hm.shard_names(out)) == len(hm.shard_names(run.sharded[-1]))
    assert [len(v) for v in written.values()] == [len(v) for v in newest.values()]
    # Keras loads it, and every weight is the reference; the optimizer state is the newest's.
    hm.assert_weights_equal(hm.load_weights_into_model(out), run.reference)
    got = hm.sharded_tensors(out)
    for name, value in run.newest_optimizer.items():
        np.testing.assert_array_equal(got[name], value)
    # Only the index, its shards and the placeholder Keras' loader opens first are written.
    expected = {out.name, "avg_00000.weights.h5", *hm.shard_names(out)}
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert (tmp_path / "avg_00000.weights.h5").read_bytes() == placeholder_bytes()


def test_a_second_run_replaces_a_keras_written_output_and_removes_its_shards(run, tmp_path):
    import keras

    out = tmp_path / "avg.weights.json"
    model = hm.build_model(keras)
    model.optimizer.build(model.trainable_variables)
    model.save_weights(out, max_shard_size=0.0105)  # the previous output: Keras' own shards
    assert len(hm.shard_names(out)) >= 3
    wavg.combine(run.sharded, out)
    first = hm.shard_names(out)
    wavg.combine(run.sharded, out, drop_optimizer=True)
    names = hm.shard_names(out)
    assert not set(names) & set(first)
    assert {p.name for p in tmp_path.iterdir()} == {out.name, "avg_00000.weights.h5", *names}
    assert (tmp_path / "avg_00000.weights.h5").read_bytes() == placeholder_bytes()
    assert not any("optimizer" in name for name in hm.sharded_tensors(out))
    index = json.loads(out.read_text())
    assert index["metadata"]["total_size"] == sum(r.nbytes for r in run.reference)


def test_a_dry_run_checks_every_shard_and_writes_nothing(run, tmp_path):
    out = tmp_path / "avg.weights.json"
    summary = wavg.combine(run.sharded, out, dry_run=True)
    assert summary.dry_run and summary.tensors == 10
    assert list(tmp_path.iterdir()) == []


def _damage(kind: str, inputs: list[Path], directory: Path) -> tuple[Path, list[str]]:
    """Damage the newest input as `kind` says; return the file to name and words to expect."""
    index = inputs[-1]
    document = json.loads(index.read_text())
    weight_map = document["weight_map"]
    shards = hm.shard_names(index)
    first_group = next(iter(weight_map))
    if kind == "missing_shard":
        (directory / shards[1]).unlink()
        return index, [shards[1], "missing"]
    if kind in ("parent_dir", "absolute", "drive", "backslash"):
        name = {
            "parent_dir": "../" + shards[0],
            "absolute": str(directory / shards[0]),
            "drive": "C:" + shards[0],
            "backslash": "..\\" + shards[0],
        }[kind]
        weight_map[first_group] = [name]
        index.write_text(json.dumps(document))
        return index, ["not a plain file name"]
    if kind == "symlink_out":
        outside = directory / "outside"
        outside.mkdir()
        target = outside / shards[0]
        (directory / shards[0]).rename(target)
        (directory / shards[0]).symlink_to(target)
        return index, [shards[0], "symlink"]
    if kind == "tensor_twice":
        twin = directory / "twin.weights.h5"
        shutil.copy(directory / shards[0], twin)
        weight_map[first_group] = [shards[0], twin.name]
        index.write_text(json.dumps(document))
        return twin, ["also in"]
    if kind == "group_unlisted":
        del weight_map[first_group]
        index.write_text(json.dumps(document))
        return directory / shards[0], ["does not list"]
    if kind == "wrong_shard":
        weight_map[first_group] = [shards[0], shards[-1]]
        index.write_text(json.dumps(document))
        return index, [first_group, "holds no tensor"]
    if kind == "same_file_twice":
        os.link(directory / shards[0], directory / "alias.weights.h5")
        weight_map[first_group] = [shards[0], "alias.weights.h5"]
        index.write_text(json.dumps(document))
        return index, ["one file"]
    if kind == "duplicate_key":
        text = index.read_text().replace("{", '{"weight_map": {}, ', 1)
        index.write_text(text)
        return index, ["appears twice"]
    if kind == "not_json":
        index.write_bytes(b"{ this is not json")
        return index, ["not a valid sharded weights index"]
    if kind == "shard_not_hdf5":
        (directory / shards[1]).write_bytes(b"\0" * 4096)
        return directory / shards[1], ["HDF5"]
    raise AssertionError(kind)


BAD_INDEXES = [
    "missing_shard",
    "parent_dir",
    "absolute",
    "drive",
    "backslash",
    "symlink_out",
    "tensor_twice",
    "group_unlisted",
    "wrong_shard",
    "same_file_twice",
    "duplicate_key",
    "not_json",
    "shard_not_hdf5",
]


@pytest.mark.parametrize("kind", BAD_INDEXES)
def test_a_bad_index_or_shard_is_refused_in_one_line_naming_the_file(kind, run, tmp_path, capfd):
    inputs_dir = tmp_path / "in"
    inputs_dir.mkdir()
    inputs = copy_run(run, inputs_dir)
    named, words = _damage(kind, inputs, inputs_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with hs.inputs_untouched([p for p in inputs_dir.iterdir() if p.is_file()]):
        result = hs.run_cli(["combine", *inputs, "-o", out_dir / "avg.weights.json"], capfd)
    line = hs.assert_one_line_error(result, [named])
    for word in words:
        assert word in line, line
    assert list(out_dir.iterdir()) == []


def test_a_shard_replaced_during_the_run_is_refused_and_nothing_is_written(run, tmp_path):
    inputs = copy_run(run, tmp_path)
    shard = tmp_path / hm.shard_names(inputs[0])[0]
    out = tmp_path / "avg.weights.json"

    def replace_shard(summary) -> None:
        replacement = tmp_path / "replacement"
        shutil.copy(shard, replacement)
        os.replace(replacement, shard)

    plan = wavg.plan_combine(inputs)
    with pytest.raises(InputChanged, match="changed while it was being read") as caught:
        wavg.run_plan(plan, out, on_ready=replace_shard)
    assert str(shard) in str(caught.value)
    assert not out.exists() and hs.leftovers(tmp_path) == []
    assert not any(".wavg-" in p.name for p in tmp_path.iterdir())


def test_sharded_and_single_file_inputs_are_not_mixed(run, tmp_path, capfd):
    import keras

    single = tmp_path / "ep9.weights.h5"
    model = hm.build_model(keras)
    model.optimizer.build(model.trainable_variables)
    model.save_weights(single)
    result = hs.run_cli(
        ["combine", single, run.sharded[-1], "-o", tmp_path / "a.weights.json"], capfd
    )
    hs.assert_one_line_error(result, [single, "format"])


def test_the_output_must_be_named_like_an_index(run, tmp_path, capfd):
    result = hs.run_cli(["combine", *run.sharded, "-o", tmp_path / "avg.weights.h5"], capfd)
    hs.assert_one_line_error(result, [".weights.json"], code=2)
    assert list(tmp_path.iterdir()) == []


def test_kill_9_at_random_moments_leaves_the_previous_output_or_the_complete_new_one(run, tmp_path):
    import keras

    out = tmp_path / "avg.weights.json"
    model = hm.build_model(keras)
    model.optimizer.build(model.trainable_variables)
    model.save_weights(out, max_shard_size=0.0105)  # a previous output written by Keras
    previous = hm.output_state(out)
    original = set(previous)  # killed after its commit, a run leaves these for the next one
    rng = random.Random(9)
    outcomes = {"previous": 0, "complete": 0}
    killed: list[int] = []
    for trial in range(KILL_TRIALS):
        proc = hm.start_combine(run.sharded, out)
        if trial % 2:  # anywhere in the run, start-up included
            time.sleep(rng.uniform(0.0, 1.0))
        elif hm.wait_until_writing(tmp_path, proc):  # while it writes
            time.sleep(rng.uniform(0.0, 0.6))
        hm.terminate(proc)
        killed.append(proc.pid)
        # Keras' loader can open whatever is there: the placeholder and every named shard.
        with h5py.File(tmp_path / "avg_00000.weights.h5", "r"):
            pass
        state = hm.output_state(out)
        if state == previous:
            outcomes["previous"] += 1
        else:
            got = hm.sharded_tensors(out)
            assert set(got) == set(hm.sharded_tensors(run.sharded[-1]))
            outcomes["complete"] += 1
            previous = state
        # Nothing but the output, what killed runs were writing, and stale shards.
        pattern = hm.killed_run_files(out, killed)
        for path in tmp_path.iterdir():
            assert path.name in set(state) | original or pattern.fullmatch(path.name), path.name
    # The next run removes what the killed ones left and writes the average.
    result = hs.run_wavg(["combine", *run.sharded, "-o", out])
    assert result.code == 0, result.stderr
    assert {p.name for p in tmp_path.iterdir()} == {
        out.name,
        "avg_00000.weights.h5",
        *hm.shard_names(out),
    }
    assert (tmp_path / "avg_00000.weights.h5").read_bytes() == placeholder_bytes()
    hm.assert_weights_equal(hm.load_weights_into_model(out), run.reference)
    assert outcomes["previous"] > 0
    print(f"kill -9 trials on a sharded output: {outcomes}")


def test_dying_before_each_step_of_the_commit_leaves_a_loadable_previous_or_new_output(
    run, tmp_path
):
    import keras

    out = tmp_path / "avg.weights.json"
    model = hm.build_model(keras)
    model.optimizer.build(model.trainable_variables)
    model.save_weights(out, max_shard_size=0.0105)
    outcomes = {"previous": 0, "complete": 0}
    step = 0
    while True:
        step += 1
        before = hm.output_state(out)
        proc = hm.run_dying_at(step, run.sharded, out)
        if proc.returncode == 0:
            break
        assert proc.returncode == 137, proc.stderr
        with h5py.File(tmp_path / "avg_00000.weights.h5", "r"):
            pass
        state = hm.output_state(out)
        if state != before:
            hm.assert_weights_equal(hm.load_weights_into_model(out), run.reference)
        outcomes["previous" if state == before else "complete"] += 1
    assert outcomes["previous"] > 5 and outcomes["complete"] > 0, outcomes
    # The run that went through, then the next one, leave only the output.
    result = hs.run_wavg(["combine", *run.sharded, "-o", out])
    assert result.code == 0, result.stderr
    assert {p.name for p in tmp_path.iterdir()} == {
        out.name,
        "avg_00000.weights.h5",
        *hm.shard_names(out),
    }
    hm.assert_weights_equal(hm.load_weights_into_model(out), run.reference)
    print(f"died before each of {step} steps: {outcomes}")


def test_shards_past_the_descriptor_budget_are_reopened_per_read_with_the_same_result(
    run, tmp_path, monkeypatch
):
    from wavg.storage.descriptors import OPEN_FILES

    kept = tmp_path / "kept.weights.json"
    wavg.combine(run.sharded, kept)
    # Room for the inputs, none for their shards: the shards reopen per read.
    monkeypatch.setattr(OPEN_FILES, "_left", len(run.sharded))
    reopened = tmp_path / "reopened.weights.json"
    wavg.combine(run.sharded, reopened)
    first, second = hm.sharded_tensors(kept), hm.sharded_tensors(reopened)
    assert first.keys() == second.keys()
    for name, value in first.items():
        np.testing.assert_array_equal(second[name], value)


def test_sigterm_while_writing_removes_what_the_run_wrote_and_keeps_the_previous_output(
    run, tmp_path
):
    out = tmp_path / "avg.weights.json"
    wavg.combine(run.sharded, out)
    previous = hm.output_state(out)
    for _ in range(3):  # the output may appear late on a busy machine: retry
        proc = hm.start_combine(run.sharded, out)
        started = hm.wait_until_writing(tmp_path, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        if started and proc.returncode != 0:
            break
    assert proc.returncode == 143, stderr
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    assert hm.output_state(out) == previous
    assert {p.name for p in tmp_path.iterdir()} == {*previous, "avg_00000.weights.h5"}


@given(st.text(min_size=0, max_size=40))
def test_a_shard_name_the_index_check_accepts_never_leaves_the_index_folder(name):
    from wavg.errors import UnsafeCheckpoint
    from wavg.formats.sharded.index import check_shard_name

    folder = Path("/data/run")
    try:
        check_shard_name(name, "m.weights.json")
    except UnsafeCheckpoint:
        return
    target = folder / name
    assert target.parent == folder and target.name == name
    assert os.path.normpath(target) == str(target)


@pytest.mark.parametrize("limit", [0, 4 << 20])
def test_a_file_size_limit_is_a_clean_error_and_keeps_the_previous_output(limit, run, tmp_path):
    out = tmp_path / "avg.weights.json"
    wavg.combine(run.sharded, out)
    previous = hm.output_state(out)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [*hs.WAVG, "combine", *map(str, run.sharded), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=hs.ROOT,
        preexec_fn=limit_file_size,  # noqa: PLW1509 (only setrlimit)
        timeout=120,
        check=False,
    )
    line = hs.assert_one_line_error(hs.Result(proc.returncode, "", proc.stderr), [out])
    assert "too large" in line.lower(), line
    assert hm.output_state(out) == previous
    assert {p.name for p in tmp_path.iterdir()} == {*previous, "avg_00000.weights.h5"}


def test_shards_another_index_in_the_folder_names_are_never_removed(run, tmp_path):
    out = tmp_path / "avg.weights.json"
    wavg.combine(run.sharded, out)
    kept = tmp_path / "best.weights.json"
    shutil.copy(out, kept)  # the user keeps this average under another name
    wavg.combine(run.sharded, out, drop_optimizer=True)
    assert set(hm.shard_names(kept)).isdisjoint(hm.shard_names(out))
    for name in hm.shard_names(kept):
        assert (tmp_path / name).is_file(), name
    assert hm.sharded_tensors(kept).keys() == hm.sharded_tensors(run.sharded[-1]).keys()


def test_requantized_layers_of_sharded_and_folder_checkpoints_equal_the_single_file_result(
    tmp_path,
):
    import keras

    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(512),
            keras.layers.Dense(512),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(0)
    for epoch in range(3):
        model.set_weights([rng.standard_normal(w.shape).astype("f4") for w in model.get_weights()])
        quantized = keras.models.clone_model(model)
        quantized.set_weights(model.get_weights())
        quantized.quantize("int8")
        quantized.save_weights(tmp_path / f"q{epoch}.weights.json", max_shard_size=0.00026)
        quantized.save(tmp_path / f"folder{epoch}", zipped=False)
        quantized.save_weights(tmp_path / f"q{epoch}.weights.h5")
    assert len(hm.shard_names(tmp_path / "q2.weights.json")) == 2

    def run(pattern: str, out: str) -> Path:
        inputs = sorted(tmp_path.glob(pattern))
        wavg.combine(inputs, tmp_path / out, quantized="requantize")
        return tmp_path / out

    single = h5py.File(run("q?.weights.h5", "single.weights.h5"), "r")
    sharded = hm.sharded_tensors(run("q?.weights.json", "sharded.weights.json"))
    folder = run("folder?", "folder_avg") / "model.weights.h5"
    with single, h5py.File(folder, "r") as from_folder:
        names: list[str] = []
        single.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(names) == sorted(sharded)
        for name in names:
            np.testing.assert_array_equal(sharded[name], single[name][()], err_msg=name)
            np.testing.assert_array_equal(from_folder[name][()], single[name][()], err_msg=name)


def test_a_sharded_output_url_gets_its_shards_and_index_and_reads_back_as_an_input(
    run, tmp_path, capfd
):
    import fsspec

    memory = fsspec.filesystem("memory")
    url = "memory://wavg-sharded-test/run/avg.weights.json"
    wavg.combine(run.sharded, url)
    local = tmp_path / "avg.weights.json"
    wavg.combine(run.sharded, local)
    uploaded = {p.rsplit("/", 1)[-1] for p in memory.find("/wavg-sharded-test/run")}
    index = json.loads(memory.cat(url))
    names = {n for v in index["weight_map"].values() for n in (v if isinstance(v, list) else [v])}
    assert uploaded == {"avg.weights.json", "avg_00000.weights.h5", *names}
    assert len(names) == len(hm.shard_names(local))
    again = tmp_path / "again.weights.json"
    result = hs.run_cli(["combine", "--order", "given", url, run.sharded[-1], "-o", again], capfd)
    assert result.code == 0, result.stderr
    assert hm.sharded_tensors(again).keys() == hm.sharded_tensors(local).keys()
    memory.rm("/wavg-sharded-test", recursive=True)
