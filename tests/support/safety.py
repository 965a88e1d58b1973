"""Shared helpers of the safety suites (untrusted files, damaged inputs, crash safety, fuzz).

Import explicitly (``from support import safety as hs``); nothing here is a pytest plugin.

- `snapshot` / `assert_unchanged`: sha256 and mtime of every input, before and after a run;
- `run_cli` (in-process, fast) and `run_wavg` (a real subprocess) return exit code and output;
- `assert_one_line_error`: the CLI contract for a refused input;
- `h5_tensors`, `reference_average`, `assert_is_average`: an independent oracle (plain h5py
  and zipfile) for what an averaged output must hold;
- `keras_fixtures`: small Keras checkpoints made once per session in a subprocess (so the
  test process never imports TensorFlow); run this file as a script to make them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = ROOT / "sample_checkpoints"
TMP_MARKER = ".wavg-tmp-"
_FIXTURES: dict[str, object] = {}


def samples(tmp_path_factory) -> list[Path]:
    """Session copies of sample_checkpoints/model_490.h5 ... model_499.h5.

    Copied once, so a concurrent ``make_sample_checkpoints.sh`` cannot pull them away.
    """
    if "samples" not in _FIXTURES:
        directory = tmp_path_factory.mktemp("samples")
        names = [f"model_{i}.h5" for i in range(490, 500)]
        for _ in range(120):
            try:
                for name in names:
                    shutil.copy(SAMPLE_DIR / name, directory / name)
                break
            except FileNotFoundError:
                time.sleep(1)  # being regenerated right now
        _FIXTURES["samples"] = [directory / name for name in names]
    return _FIXTURES["samples"]


WAVG = [sys.executable, "-m", "wavg.cli"]


# ---------------------------------------------------------------------------------------------
# inputs never change


def snapshot(paths) -> dict[Path, tuple[str, int]]:
    """sha256 and mtime (ns) of each existing regular file in `paths`."""
    result = {}
    for path in map(Path, paths):
        if path.is_file() and os.access(path, os.R_OK):
            result[path] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return result


def assert_unchanged(before: dict[Path, tuple[str, int]]) -> None:
    after = snapshot(before)
    for path, state in before.items():
        assert after.get(path) == state, f"input {path} was modified"


@contextlib.contextmanager
def inputs_untouched(paths):
    """Assert that every file of `paths` has the same bytes and mtime after the block."""
    before = snapshot(paths)
    yield before
    assert_unchanged(before)


def sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(directory: Path) -> list[str]:
    """Temporary files of wavg left in `directory`."""
    return sorted(p.name for p in directory.iterdir() if TMP_MARKER in p.name)


# ---------------------------------------------------------------------------------------------
# running the CLI


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_cli(args, capfd) -> Result:
    """Run ``wavg`` in this process through `wavg.cli.main` (its handlers restored after)."""
    from wavg.cli import main

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGXFSZ)}
    capfd.readouterr()
    try:
        code = main([str(a) for a in args])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    out, err = capfd.readouterr()
    return Result(code, out, err)


# Root passes every permission check through two capabilities. Dropping them from the
# bounding set (so an exec cannot regain them) leaves a root process bound by permission bits
# like any user, while it keeps its own uid: it still reaches this checkout and its .venv
# wherever they are (a fresh clone in a private `mktemp -d` directory, mode 0700, is one
# that `nobody` could not even enter).
UNPRIVILEGED = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
]


def run_wavg(args, *, timeout: float = 60, unprivileged: bool = False, **kwargs) -> Result:
    """Run the real ``wavg`` CLI in a subprocess.

    `unprivileged`: the run must be refused by file permissions. As root it runs without the
    capabilities that override them (see `UNPRIVILEGED`); any other user already is.
    """
    prefix = UNPRIVILEGED if unprivileged and os.geteuid() == 0 else []
    proc = subprocess.run(
        [*prefix, *WAVG, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=kwargs.pop("cwd", ROOT),
        check=False,
        **kwargs,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(result: Result, names=(), code: int = 1) -> str:
    """The CLI contract: exit `code`, one stderr line ``wavg: error: ...`` naming `names`."""
    assert result.code == code, (result.code, result.stderr)
    lines = result.stderr.splitlines()
    # Errors found while writing come after the plan table (printed once inputs are checked).
    assert len(lines) == 1 or lines[0].startswith("wavg combine:"), result.stderr
    assert sum(line.startswith("wavg: error:") for line in lines) == 1, result.stderr
    line = lines[-1]
    assert line.startswith("wavg: error: "), line
    assert "Traceback" not in result.stderr
    for name in names:
        assert str(name) in line, f"{name} not named in: {line}"
    return line


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    assert leftovers(out.parent) == []


# ---------------------------------------------------------------------------------------------
# an independent oracle for averages


def _h5_from(path: Path) -> tuple[object, contextlib.ExitStack]:
    import h5py

    stack = contextlib.ExitStack()
    if zipfile.is_zipfile(path):
        archive = stack.enter_context(zipfile.ZipFile(path))
        data = archive.read("model.weights.h5")
        h5 = stack.enter_context(h5py.File(io.BytesIO(data), "r"))
    else:
        h5 = stack.enter_context(h5py.File(path, "r"))
    return h5, stack


def h5_tensors(path: str | os.PathLike[str], *, model_only: bool = True) -> dict:
    """Every float dataset of a checkpoint as numpy arrays (optimizer state left out)."""
    import h5py
    import numpy as np

    tensors: dict = {}
    h5, stack = _h5_from(Path(path))
    with stack:

        def visit(name, obj):
            top = name.split("/", 1)[0]
            if model_only and top in ("optimizer_weights", "optimizer"):
                return
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
                tensors[name] = np.asarray(obj[()])

        h5.visititems(visit)
    return tensors


def reference_average(paths, weights=None) -> dict:
    """The weighted mean of each float model tensor, computed in float64 with plain h5py."""
    import numpy as np

    loaded = [h5_tensors(p) for p in paths]
    weights = [1.0] * len(paths) if weights is None else list(weights)
    total = sum(weights)
    result = {}
    for name, ref in loaded[-1].items():
        acc = sum(w * t[name].astype(np.float64) for w, t in zip(weights, loaded, strict=True))
        result[name] = (acc / total).astype(ref.dtype)
    return result


def assert_is_average(out, paths, weights=None) -> None:
    import numpy as np

    got = h5_tensors(out)
    want = reference_average(paths, weights)
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=2e-6, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Keras-made fixtures


def keras_fixtures(tmp_path_factory) -> Path:
    """Make the Keras fixtures once per session (one TensorFlow start-up, in a subprocess)."""
    if "dir" not in _FIXTURES:
        directory = tmp_path_factory.mktemp("keras_fixtures")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
        proc = subprocess.run(
            [sys.executable, __file__, str(directory)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        _FIXTURES["dir"] = directory
    return _FIXTURES["dir"]


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def _make_keras_fixtures(directory: Path) -> None:  # pragma: no cover - runs in a subprocess
    """Checkpoints of a tiny MLP in every format, and models that carry code.

    - ``keras/model_{1,2,3}.keras``, ``weights/model_{1,2,3}.weights.h5``: trained a step
      (optimizer state present), different weights;
    - ``wide/model_4.keras``, ``wide/model_4.weights.h5``: another architecture;
    - ``code/model_{1,2}.keras`` and ``code/model_{1,2}.h5``: a Lambda layer holding marshalled
      bytecode that creates ``MARKER``, plus a config entry referencing ``os.system`` with a
      command that creates it too.
    """
    import keras
    import numpy as np

    marker = directory / "MARKER"
    directory.mkdir(parents=True, exist_ok=True)

    def mlp(hidden: int, code: bool = False):
        layers = [keras.Input(shape=(4,)), keras.layers.Dense(hidden, activation="relu")]
        if code:
            payload = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
            layers.append(keras.layers.Lambda(payload, name="payload"))
        layers.append(keras.layers.Dense(3))
        model = keras.Sequential(layers)
        model.compile(optimizer="adam", loss="mse")
        return model

    def train(model, seed: int) -> None:
        rng = np.random.default_rng(seed)
        model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.weights])
        model.fit(rng.random((8, 4)), rng.random((8, 3)), epochs=1, verbose=0)

    for sub in ("keras", "weights", "wide", "code"):
        (directory / sub).mkdir(exist_ok=True)
    model = mlp(8)
    for i in (1, 2, 3):
        train(model, i)
        model.save(directory / "keras" / f"model_{i}.keras")
        model.save_weights(directory / "weights" / f"model_{i}.weights.h5")
    wide = mlp(16)
    train(wide, 4)
    wide.save(directory / "wide" / "model_4.keras")
    wide.save_weights(directory / "wide" / "model_4.weights.h5")

    system_call = {
        "module": "os",
        "class_name": "function",
        "config": "system",
        "registered_name": "system",
    }
    command = f"touch {marker}"
    coded = mlp(8, code=True)
    for i in (1, 2):
        train(coded, 10 + i)
        coded.save(directory / "code" / f"model_{i}.keras")
        coded.save(directory / "code" / f"model_{i}.h5")

    # Prove the bytecode payload is live: loading without safe mode runs it.
    verified = {}
    for name in ("model_1.keras", "model_1.h5"):
        marker.unlink(missing_ok=True)
        try:
            loaded = keras.saving.load_model(directory / "code" / name, safe_mode=False)
            loaded(np.zeros((1, 4), dtype="float32"))
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
            verified[name] = f"load failed: {type(exc).__name__}"
        else:
            verified[name] = marker.exists()
    marker.unlink(missing_ok=True)

    # Add a layer whose function is os.system(command) to each stored config.
    def add_system_layer(config: dict) -> dict:
        layers = config["config"]["layers"]
        lam = next(layer for layer in layers if layer["class_name"] == "Lambda")
        evil = json.loads(json.dumps(lam))
        evil["config"]["name"] = "system"
        evil["config"]["function"] = system_call
        evil["config"]["arguments"] = {"command": command}
        layers.insert(layers.index(lam) + 1, evil)
        return config

    import h5py

    for i in (1, 2):
        path = directory / "code" / f"model_{i}.keras"
        with zipfile.ZipFile(path) as src:
            members = {info.filename: (info, src.read(info)) for info in src.infolist()}
        info, config = members["config.json"]
        members["config.json"] = (info, json.dumps(add_system_layer(json.loads(config))).encode())
        with zipfile.ZipFile(path, "w") as dst:
            for info, data in members.values():
                dst.writestr(info, data)
        with h5py.File(directory / "code" / f"model_{i}.h5", "r+") as h5:
            config = json.loads(h5.attrs["model_config"])
            h5.attrs["model_config"] = json.dumps(add_system_layer(config))

    marker.unlink(missing_ok=True)
    (directory / "manifest.json").write_text(
        json.dumps({"marker": str(marker), "payload_runs_when_loaded_unsafely": verified})
    )


if __name__ == "__main__":
    _make_keras_fixtures(Path(sys.argv[1]))
