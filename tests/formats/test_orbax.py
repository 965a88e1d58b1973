"""Orbax checkpoints: real OrbaxCheckpoint runs under JAX and TensorFlow, averaged and reloaded.

Keras trains and reloads in subprocesses (`orbax_keras_job.py`), one per backend, since
the backend is fixed at import; the averages are checked here against a float64 numpy mean
of the arrays read with TensorStore.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from hypothesis import given, settings
from hypothesis import strategies as st
from support.kerasfiles import assert_one_line_error, run_wavg
from support.orbax_runs import KINDS, array_names, keras_jobs, read_array, store_spec

from wavg.errors import UnsafeCheckpoint
from wavg.formats.orbax.step import _parse_location, box_at, chunk_boxes

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(orbax_roots) -> Path:
    """``<backend>/<kind>``: OrbaxCheckpoint roots of 4 epochs (steps 0-3), every step kept."""
    return orbax_roots


def _expected_mean(steps: list[Path], name: str) -> np.ndarray:
    arrays = [read_array(step, name) for step in steps]
    return np.mean([a.astype(np.float64) for a in arrays], axis=0).astype(arrays[0].dtype)


def test_averaged_roots_load_in_keras_on_both_backends_with_the_float64_mean(runs, tmp_path):
    outs = {}
    for backend, kinds in KINDS.items():
        for kind in kinds:
            out = tmp_path / f"{backend}-{kind}"
            code, stdout, stderr = run_wavg(
                "combine", runs / backend / kind, "--last", "3", "-o", out
            )
            assert code == 0, stderr
            assert "orbax" in stdout
            outs[(backend, kind)] = out
    keras_jobs(
        *(
            (
                loader,
                "load",
                *(f"{o},{k},{tmp_path / f'{loader}-{b}-{k}.npz'}" for (b, k), o in outs.items()),
            )
            for loader in KINDS
        )
    )
    for (backend, kind), out in outs.items():
        steps = [runs / backend / kind / str(i) for i in (1, 2, 3)]
        assert [p.name for p in out.iterdir()] == ["3"]
        averaged = [
            n for n in array_names(steps[-1]) if n.split(".")[0].endswith("trainable_variables")
        ]
        assert averaged
        for loader in KINDS:
            loaded = np.load(tmp_path / f"{loader}-{backend}-{kind}.npz")
            assert sorted(loaded.files) == sorted(averaged)
            for name in averaged:
                mean = _expected_mean(steps, name)
                assert mean.dtype == (ml_dtypes.bfloat16 if kind == "bf16" else np.float32)
                np.testing.assert_array_equal(loaded[name], mean.astype(np.float32), name)
                # Arrays that moved during training (bfloat16 biases do not) move away from
                # the newest: Keras would leave an unmatched variable as initialised.
                newest = read_array(steps[-1], name)
                if not all(np.array_equal(read_array(s, name), newest) for s in steps):
                    assert not np.array_equal(mean, newest), name


def test_optimizer_state_and_metrics_come_from_the_newest_step(runs, tmp_path):
    for backend in KINDS:
        newest = runs / backend / "functional" / "3"
        out = tmp_path / backend
        assert run_wavg("combine", newest.parent, "--last", "3", "-o", out)[0] == 0
        copied = [
            n for n in array_names(newest) if not n.split(".")[0].endswith("trainable_variables")
        ]
        assert "optimizer_variables.adam.iteration" in copied
        for name in copied:
            mine, theirs = read_array(out / "3", name), read_array(newest, name)
            assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs), name
        assert read_array(out / "3", "optimizer_variables.adam.iteration") == 16  # 4 epochs x 4


def test_drop_optimizer_leaves_the_optimizer_out_of_arrays_and_metadata(runs, tmp_path):
    root = runs / "jax" / "functional"
    out = tmp_path / "out"
    assert run_wavg("combine", root, "--drop-optimizer", "-o", out)[0] == 0
    names = array_names(out / "3")
    assert names and not [n for n in names if n.startswith("optimizer_variables")]
    assert len(names) == len([n for n in array_names(root / "3") if "optimizer" not in n])
    kv = ts.KvStore.open(store_spec(out / "3", "x")["kvstore"] | {"path": ""}).result()
    assert not [k for k in kv.list().result() if k.startswith(b"optimizer_variables")]
    pytree = out / "3" / "pytree"
    sharding = json.loads((pytree / "_sharding").read_text())
    assert sorted(base64.b64decode(k).decode() for k in sharding) == sorted(names)
    assert "optimizer_variables" not in (pytree / "array_metadatas" / "process_0").read_text()


def test_unfinished_steps_are_skipped_and_reported(runs, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(runs / "jax" / "functional", root)
    shutil.copytree(root / "3", root / "4.orbax-checkpoint-tmp")
    shutil.copytree(root / "3", root / "5")
    (root / "5" / "commit_success.txt").unlink()
    code, stdout, stderr = run_wavg(
        "combine", root, "--last", "3", "-o", tmp_path / "out", "--json"
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert [Path(i["path"]).name for i in summary["inputs"]] == ["1", "2", "3"]
    assert len(summary["warnings"]) == 2
    assert "4.orbax-checkpoint-tmp" in summary["warnings"][0]
    assert "commit_success.txt" in summary["warnings"][1]
    assert "wavg: warning:" in stderr


def test_a_root_kept_with_the_default_max_to_keep_is_refused_naming_max_to_keep(runs, tmp_path):
    root = runs / "jax" / "functional-default"
    code, _, stderr = run_wavg("combine", root, "-o", tmp_path / "out")
    assert_one_line_error(code, stderr, str(root), "max_to_keep")
    assert not list(tmp_path.iterdir())


def test_step_directories_can_be_given_one_by_one(runs, tmp_path):
    root = runs / "tensorflow" / "sequential"
    code, stdout, stderr = run_wavg(
        "combine", root / "3", root / "1", "-o", tmp_path / "out", "--json"
    )
    assert code == 0, stderr
    assert [i["epoch"] for i in json.loads(stdout)["inputs"]] == [1, 3]
    name = "trainable_variables.seq.d1.kernel"
    np.testing.assert_array_equal(
        read_array(tmp_path / "out" / "3", name), _expected_mean([root / "1", root / "3"], name)
    )


def test_paths_with_percent_signs_spaces_and_hashes_are_taken_literally(runs, tmp_path):
    folder = tmp_path / "a %20 #b"
    shutil.copytree(runs / "jax" / "functional", folder / "root")
    code, _, stderr = run_wavg("combine", folder / "root", "-o", folder / "out")
    assert code == 0, stderr
    name = "trainable_variables.d1.kernel"
    steps = [folder / "root" / str(i) for i in range(4)]
    np.testing.assert_array_equal(
        read_array(folder / "out" / "3", name), _expected_mean(steps, name)
    )


def _damaged(runs: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(runs / "jax" / "functional", root)
    return root


def _refused(root: Path, tmp_path: Path, *words: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, stderr = run_wavg("combine", root, "-o", tmp_path / "out")
    assert_one_line_error(code, stderr, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def _rewrite(step: Path, name: str, data: np.ndarray) -> None:
    """Replace an array of a step with `data` (another shape or dtype), as TensorStore would."""
    spec = store_spec(step, name)
    store = ts.open(spec, create=True, delete_existing=True, dtype=data.dtype, shape=data.shape)
    store.result().write(data).result()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (np.zeros((4, 9), np.float32), ("shape (4, 9)", "(4, 8)")),
        (np.zeros((4, 8), np.float64), ("float64", "float32")),
    ],
)
def test_steps_whose_arrays_differ_are_refused_naming_step_and_array(runs, tmp_path, data, words):
    root = _damaged(runs, tmp_path)
    _rewrite(root / "2", "trainable_variables.d1.kernel", data)
    _refused(root, tmp_path, str(root / "2"), "trainable_variables.d1.kernel", *words)


def test_an_array_declaring_far_more_than_the_step_stores_is_refused(runs, tmp_path):
    root = _damaged(runs, tmp_path)
    name = "trainable_variables.d1.kernel"
    shape = [1 << 20, 1 << 10]  # 4 GiB of float32 in one chunk, none of it stored
    metadata = {"shape": shape, "data_type": "float32"}
    metadata["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": shape}}
    ts.open(
        {**store_spec(root / "3", name), "metadata": metadata}, create=True, delete_existing=True
    ).result()
    _refused(root, tmp_path, str(root / "3"), "decompression bomb")


def test_quantized_kernels_are_refused_not_copied_beside_averaged_scales(runs, tmp_path):
    root = _damaged(runs, tmp_path)
    for step in root.iterdir():
        _rewrite(step, "trainable_variables.d1.kernel", np.ones((4, 8), np.int8))
    _refused(root, tmp_path, "trainable_variables.d1.kernel", "quantized")


def test_a_step_missing_an_array_is_refused(runs, tmp_path):
    root = _damaged(runs, tmp_path)
    meta_path = root / "1" / "pytree" / "_METADATA"
    meta = json.loads(meta_path.read_text())
    entry = json.loads(json.dumps(next(iter(meta["tree_metadata"].values()))))
    entry["key_metadata"][-1]["key"] = "ghost"
    meta["tree_metadata"]["ghost"] = entry
    meta_path.write_text(json.dumps(meta))
    _refused(root, tmp_path, str(root / "1"), "ghost", "missing")


def test_a_step_with_a_corrupt_store_is_refused(runs, tmp_path):
    root = _damaged(runs, tmp_path)
    for data_file in (root / "2" / "pytree" / "d").iterdir():
        data_file.write_bytes(b"\0" * data_file.stat().st_size)
    _refused(root, tmp_path, str(root / "2"))


def test_steps_of_different_model_configs_are_refused(runs, tmp_path):
    root = _damaged(runs, tmp_path)
    config = root / "1" / "model_config" / "_strings.json"
    config.write_text(config.read_text().replace("d1", "dense_one"))
    _refused(root, tmp_path, str(root / "1"), "model config")


def test_a_step_leading_outside_itself_through_a_symlink_is_refused(runs, tmp_path):
    root = _damaged(runs, tmp_path)
    data = next((root / "2" / "pytree" / "d").iterdir())
    outside = tmp_path / "elsewhere"
    data.rename(outside)
    data.symlink_to(outside)
    _refused(root, tmp_path, "symlink")


def test_an_existing_output_directory_is_left_alone(runs, tmp_path):
    out = tmp_path / "out"
    (out / "7").mkdir(parents=True)
    code, _, stderr = run_wavg("combine", runs / "jax" / "functional", "-o", out)
    assert_one_line_error(code, stderr, str(out), "exists")
    assert [p.name for p in out.iterdir()] == ["7"]


_BLOCKER = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Blocker())
from wavg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _combine_without(blocked: set[str], *args: object) -> subprocess.CompletedProcess:
    code = _BLOCKER.replace("{BLOCKED}", repr(blocked))
    return subprocess.run(
        [sys.executable, "-c", code, "combine", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_combine_needs_neither_jax_nor_orbax_nor_keras(runs, tmp_path):
    blocked = {"jax", "jaxlib", "orbax", "keras", "tensorflow"}
    done = _combine_without(blocked, runs / "jax" / "functional", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "3" / "commit_success.txt").is_file()


def test_without_tensorstore_an_orbax_input_gets_the_install_hint(runs, tmp_path):
    done = _combine_without({"tensorstore"}, runs / "jax" / "functional", "-o", tmp_path / "out")
    assert_one_line_error(done.returncode, done.stderr, "pip install '.[orbax]'")
    assert not (tmp_path / "out").exists()


def test_arrays_stored_in_several_chunks_are_averaged_chunk_by_chunk(runs, tmp_path):
    """As on several devices, where each chunk is one device's shard."""
    root = _damaged(runs, tmp_path)
    name = "trainable_variables.d1.kernel"
    rng = np.random.default_rng(3)
    for step in root.iterdir():
        spec = {
            **store_spec(step, name),
            "metadata": {
                "shape": [4, 8],
                "data_type": "float32",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [3, 3]}},
            },
        }
        store = ts.open(spec, create=True, delete_existing=True).result()
        store.write(rng.random((4, 8), dtype=np.float32)).result()
    out = tmp_path / "out"
    assert run_wavg("combine", root, "--last", "3", "-o", out)[0] == 0
    steps = [root / str(i) for i in (1, 2, 3)]
    np.testing.assert_array_equal(read_array(out / "3", name), _expected_mean(steps, name))
    assert _chunks(out / "3", name) == _chunks(steps[-1], name) == (3, 3)


def _chunks(step: Path, name: str) -> tuple[int, ...]:
    spec = store_spec(step, name)
    return tuple(ts.open(spec).result().chunk_layout.read_chunk.shape)


@settings(deadline=None)  # no test may depend on timing or machine load
@given(
    st.lists(st.integers(1, 9), min_size=0, max_size=3).flatmap(
        lambda shape: st.tuples(
            st.just(tuple(shape)),
            st.tuples(*(st.integers(1, 10) for _ in shape)),
        )
    )
)
def test_chunk_boxes_cover_every_item_once_and_box_at_finds_each_box(case):
    shape, chunk = case
    seen = np.zeros(shape, np.int32)
    for start, count, slices in chunk_boxes(shape, chunk):
        seen[slices] += 1
        assert seen[slices].size == count
        assert box_at(shape, chunk, start) == slices
    assert (seen == 1).all()


@pytest.mark.parametrize(
    "location",
    ["btreenode::../outside/d/x:0:10", "value:/abs/:d/x:0:10", "value::d/../../x:0:10"],
)
def test_ocdbt_references_outside_the_store_are_refused(location):
    with pytest.raises(UnsafeCheckpoint, match="outside the step"):
        _parse_location(location, "step")


def test_a_killed_runs_temporary_root_is_removed_by_the_next_run(runs, tmp_path):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    leftover = tmp_path / f".out.wavg-tmp-{int(finished.stdout)}-0000"
    (leftover / "3").mkdir(parents=True)
    code, _, stderr = run_wavg("combine", runs / "jax" / "functional", "-o", tmp_path / "out")
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_while_writing_leaves_no_output_and_no_temporary_root(runs, tmp_path):
    """Whenever the signal lands, OUT is either absent or complete, and nothing else is left."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wavg.cli", "combine", str(runs / "jax" / "functional")]
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([*cmd, "-o", str(out)], stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and not any(".wavg-tmp-" in p.name for p in tmp_path.iterdir()):
            time.sleep(0.001)  # until it starts writing its temporary root, or ends
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        assert [p.name for p in tmp_path.iterdir() if p.name != "out"] == []
        if out.exists():  # the signal came once the output was in place (even at exit)
            assert (out / "3" / "commit_success.txt").is_file()
            assert proc.returncode in (0, 143, -signal.SIGTERM), stderr
        else:
            assert proc.returncode == 143, stderr
            assert "Traceback" not in stderr and not out.exists(), stderr


def test_chunks_larger_than_a_block_are_averaged_alone_with_weights_in_float64(runs, tmp_path):
    """A chunk of more items than a block (every Orbax array here, with 4-item blocks) is
    averaged alone, its weighted terms added a block at a time: the result is still the
    float64 weighted mean rounded once."""
    from wavg.averaging.engine import plan_combine, run_plan

    root = runs / "jax" / "functional"
    steps = [root / str(i) for i in (1, 2, 3)]
    plan = plan_combine([str(s) for s in steps], scheme="linear")
    summary = run_plan(plan, tmp_path / "out", block_items=4)
    assert summary.tensors > 0
    for name in array_names(steps[-1]):
        if not name.split(".")[0].endswith("trainable_variables"):
            continue
        arrays = [read_array(step, name) for step in steps]
        stacked = np.stack([a.astype(np.float64) for a in arrays])
        expected = np.average(stacked, axis=0, weights=plan.raw_weights).astype(arrays[0].dtype)
        np.testing.assert_array_equal(read_array(tmp_path / "out" / "3", name), expected, name)
