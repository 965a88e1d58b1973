"""Checkpoints of several files written by Keras itself, for the sharded and folder tests.

One short run of a ~11 MB model (34 MB with its Adam state) is saved three times, each time
as sharded weights with a different ``max_shard_size`` (the newest with the most shards) and
as an unzipped ``.keras`` folder. The weights Keras reports after each save are the reference.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from support import safety as hs

# The newest checkpoint has the smallest shards, so the output has several.
SHARD_SIZES_GB = (0.05, 0.02, 0.0105)
WIDTH = 1536


@dataclass(frozen=True)
class MultiRun:
    directory: Path
    sharded: tuple[Path, ...]  # ep0.weights.json ... oldest first
    folders: tuple[Path, ...]  # dir0 ... oldest first
    reference: tuple[np.ndarray, ...]  # equal-weight mean of model.get_weights(), in order
    newest_optimizer: dict[str, np.ndarray]  # optimizer/vars/N of the newest checkpoint


def build_model(keras):
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(WIDTH, activation="relu"),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(WIDTH),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    return model


@functools.cache
def multi_run(directory: Path) -> MultiRun:
    """Train briefly and save three checkpoints in both multi-file formats into `directory`."""
    import keras

    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    model = build_model(keras)
    x = rng.random((32, 64), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 3, len(x)), 3)
    sharded, folders, weights = [], [], []
    for epoch, size in enumerate(SHARD_SIZES_GB):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        index = directory / f"ep{epoch}.weights.json"
        model.save_weights(index, max_shard_size=size)
        folder = directory / f"dir{epoch}"
        model.save(folder, zipped=False)
        sharded.append(index)
        folders.append(folder)
        weights.append([np.array(w) for w in model.get_weights()])
    reference = tuple(
        np.mean(np.stack([w.astype(np.float64) for w in tensors]), axis=0).astype(tensors[0].dtype)
        for tensors in zip(*weights, strict=True)
    )
    optimizer = {
        name: value for name, value in sharded_tensors(sharded[-1]).items() if "optimizer" in name
    }
    assert len(shard_names(sharded[-1])) >= 3 and len(shard_names(sharded[0])) == 1
    return MultiRun(directory, tuple(sharded), tuple(folders), reference, optimizer)


def load_weights_into_model(path: Path) -> list[np.ndarray]:
    """What Keras itself loads from a sharded index or a model folder."""
    import keras

    if path.is_dir():
        return [np.array(w) for w in keras.models.load_model(path).get_weights()]
    model = build_model(keras)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    return [np.array(w) for w in model.get_weights()]


def shard_names(index: Path) -> list[str]:
    names: dict[str, None] = {}
    for value in json.loads(index.read_text())["weight_map"].values():
        for name in value if isinstance(value, list) else [value]:
            names.setdefault(name)
    return list(names)


def shard_names_paths(index: Path) -> list[Path]:
    """The shard files an index names, as paths beside it."""
    return [index.parent / name for name in shard_names(index)]


def sharded_tensors(index: Path) -> dict[str, np.ndarray]:
    """Every dataset of every shard the index names, by name (with plain h5py)."""
    found: dict[str, np.ndarray] = {}
    for name in shard_names(index):
        with h5py.File(index.parent / name, "r") as h5:
            h5.visititems(
                lambda n, o: found.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
            )
    return found


def assert_weights_equal(got: list[np.ndarray], reference: tuple[np.ndarray, ...]) -> None:
    assert len(got) == len(reference)
    for value, expected in zip(got, reference, strict=True):
        assert value.dtype == expected.dtype and value.shape == expected.shape
        np.testing.assert_array_equal(value, expected)


def output_state(out: Path) -> dict[str, str]:
    """sha256 of a sharded output's index and of every file it names, by name."""
    state = {out.name: hs.sha256(out)}
    for name in shard_names(out):
        state[name] = hs.sha256(out.parent / name)
    return state


def folder_state(out: Path) -> dict[str, str]:
    """sha256 of every file of a model folder (sub-folders walked), by relative path."""
    return {
        str(p.relative_to(out)): "folder" if p.is_dir() else hs.sha256(p)
        for p in sorted(out.rglob("*"))
    }


def start_combine(inputs, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*hs.WAVG, "combine", *map(str, inputs), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=hs.ROOT,
    )


def wait_until_writing(directory: Path, proc: subprocess.Popen, limit: float = 60) -> bool:
    """Wait until the run `proc` has begun its output (True: its marker or temporary folder
    exists) or has ended (False)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if any(f".wavg-tmp-{proc.pid}-" in name for name in os.listdir(directory)):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("the run neither started writing nor ended")


def killed_run_files(out: Path, pids: list[int]) -> re.Pattern[str]:
    """Names a run of `pids` killed while writing `out` may leave behind."""
    alternatives = "|".join(map(str, pids))
    base = out.name.removesuffix(".weights.json")
    temporary = rf"\.{re.escape(out.name)}\.wavg-tmp-({alternatives})-[0-9a-f]+"
    return re.compile(
        rf"{temporary}(-index|-placeholder|-previous)?"
        rf"|{re.escape(base)}_\d{{5}}\.wavg-[0-9a-f]{{8}}\.weights\.h5"
    )


def terminate(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)
    proc.communicate(timeout=60)


def dead_pid() -> int:
    """The pid of a process that has ended (for leftovers 'of a killed run')."""
    child = subprocess.Popen(["true"])
    child.wait()
    assert not _alive(child.pid)
    return child.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# A run of `wavg combine` that dies (as with kill -9: no clean-up, no handlers) just before its
# N-th step that changes the output's folder: a rename, link, unlink, fsync, folder swap...
# taken through the `os` of each module named in argv[2] (comma-separated).
STEP_DRIVER = """
import importlib, os, sys
import wavg, wavg.storage.local_target

step, count = int(sys.argv[1]), [0]

def dying(function):
    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == step:
            os._exit(137)
        return function(*args, **kwargs)
    return wrapped

class DyingOs:
    def __getattr__(self, name):
        found = getattr(os, name)
        steps = ("replace", "link", "unlink", "rename", "fsync", "mkdir", "write")
        return dying(found) if name in steps else found

for module in sys.argv[2].split(","):
    importlib.import_module(module).os = DyingOs()
if os.environ.get("WAVG_TEST_NO_EXCHANGE"):  # a file system that cannot swap two folders
    wavg.storage.local_target._exchange = lambda a, b: False
wavg.storage.local_target._exchange = dying(wavg.storage.local_target._exchange)
wavg.combine(sys.argv[4:], sys.argv[3])
print(count[0])
"""
# The modules whose file-system steps commit a file, a sharded output or a model folder.
COMMIT_MODULES = ("wavg.storage.atomic", "wavg.storage.local_target")


def run_dying_at(
    step: int, inputs, out: Path, env=None, modules: tuple[str, ...] = COMMIT_MODULES
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hs.WAVG[0], "-c", STEP_DRIVER, str(step), ",".join(modules), str(out), *map(str, inputs)],
        capture_output=True,
        text=True,
        cwd=hs.ROOT,
        timeout=120,
        check=False,
        env=env,
    )
