"""The built wheel, installed as a user installs it: core dependencies only, no Keras.

`python -m build` makes an sdist and a wheel (the wheel built from the sdist, so a file the
sdist forgets breaks the test); the wheel goes into a fresh venv with `pip install` (not
editable) and nothing else, where `wavg combine` must work and `wavg evaluate` must end in the
one-line missing-extra error. pip reuses its cache, so only the first run on a machine downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from wavg.cli import cli

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "sample_checkpoints").glob("model_*.h5"))
FRAMEWORKS = ("keras", "tensorflow", "jax", "torch", "sklearn", "matplotlib", "s3fs", "gcsfs")

pytestmark = pytest.mark.slow


def _run(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd, check=False
    )


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel and its core dependencies; returns its bin directory."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "wavg", source / "wavg", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp / "dist"
    built = _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source)
    assert built.returncode == 0, built.stderr[-3000:]
    (sdist,) = dist.glob("wavg-*.tar.gz")
    (wheel,) = dist.glob("wavg-*.whl")
    with tarfile.open(sdist) as archive:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in archive.getnames()}
    assert {"pyproject.toml", "README.md", "wavg/cli.py", "wavg/extras.py"} <= names
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"wavg/cli.py", "wavg/extras.py", "wavg/formats/hdf5/walk.py"} <= names
    assert not [n for n in names if n.startswith("tests/")]

    venv = tmp / "venv"
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
        "--disable-pip-version-check", wheel, env=_user_env(tmp),
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv / "bin"


def _user_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a user with no Keras configuration of their own."""
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "PYTHONPATH")}
    env.update(KERAS_HOME=str(tmp / "keras-home"), **extra)
    return env


def test_the_core_install_holds_no_deep_learning_framework(core_venv, tmp_path):
    script = f"import importlib.util as u; print([m for m in {FRAMEWORKS!r} if u.find_spec(m)])"
    done = _run(core_venv / "python", "-c", script, env=_user_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    done = _run(
        core_venv / "python", "-c", "import wavg; print(wavg.__file__)",
        env=_user_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert "site-packages" in done.stdout, "the venv must run the installed wheel"


def test_the_installed_wheel_combines_the_sample_checkpoints(core_venv, tmp_path):
    out = tmp_path / "avg.h5"
    done = _run(
        core_venv / "wavg", "combine", *SAMPLES, "-o", out, "--json",
        env=_user_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["format"] == "h5" and len(summary["inputs"]) == len(SAMPLES)

    def datasets(path: Path) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda n, o: found.update({n: o[()]}) if isinstance(o, h5py.Dataset) else None
            )
        return found

    inputs = [datasets(p) for p in SAMPLES]
    got = datasets(out)
    assert set(got) == set(inputs[-1])
    averaged = [name for name in got if name.startswith("model_weights/")]
    assert len(averaged) == summary["tensors"] > 0
    for name, value in got.items():
        if name in averaged:
            mean = np.mean([i[name].astype(np.float64) for i in inputs], axis=0)
            np.testing.assert_allclose(value, mean.astype(value.dtype), rtol=1e-6)
            assert not np.array_equal(value, inputs[-1][name])
        else:  # optimizer state and the rest come from the newest checkpoint
            np.testing.assert_array_equal(value, inputs[-1][name])


def test_evaluate_without_the_keras_extra_fails_in_one_line(core_venv, tmp_path):
    for backend, extra in (("", "keras"), ("jax", "keras-jax")):
        env = _user_env(tmp_path, **({"KERAS_BACKEND": backend} if backend else {}))
        done = _run(core_venv / "wavg", "evaluate", *SAMPLES, env=env, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert done.stderr.splitlines() == [
            "wavg: error: wavg evaluate needs keras, which is not installed; install it with: "
            f"pip install '.[{extra}]' in wavg's source folder"
        ]


def test_help_and_version_work_without_any_extra(core_venv, tmp_path):
    done = _run(core_venv / "wavg", "--help", env=_user_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in cli.commands:
        assert name in done.stdout
    done = _run(core_venv / "wavg", "--version", env=_user_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0 and "version" in done.stdout, done.stderr
