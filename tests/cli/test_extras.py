"""Optional extras: a command whose extra is missing fails in one line naming the pip install.

A missing module is made the way Python itself knows it: ``sys.modules[name] = None`` makes
``import name`` raise ModuleNotFoundError and ``importlib.util.find_spec(name)`` return None.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.kerasfiles import assert_one_line_error, run_wavg

from wavg.cli import cli
from wavg.errors import EXIT_USAGE
from wavg.extras import MissingExtra, install_command, keras_backend, missing_reported

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "sample_checkpoints").glob("*.h5"))


@pytest.fixture
def tensorflow_backend(monkeypatch, tmp_path):
    """Keras' default backend, whatever the machine's ~/.keras/keras.json says."""
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))


def test_evaluate_without_scikit_learn_names_the_command_and_the_pip_install(
    monkeypatch, tensorflow_backend
):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    code, out, err = run_wavg("evaluate", *SAMPLES)
    assert_one_line_error(
        code,
        err,
        "wavg evaluate needs sklearn",
        "pip install '.[keras]'",
        exit_code=EXIT_USAGE,
    )
    assert out == ""


def test_a_missing_jax_backend_asks_for_the_jax_extra(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.setitem(sys.modules, "jax", None)
    code, _, err = run_wavg("evaluate", *SAMPLES)
    assert_one_line_error(
        code,
        err,
        "wavg evaluate needs jax (the Keras backend)",
        "pip install '.[keras-jax]'",
        exit_code=EXIT_USAGE,
    )


def test_train_save_without_keras_fails_before_creating_its_directory(
    monkeypatch, tmp_path, tensorflow_backend
):
    monkeypatch.setitem(sys.modules, "keras", None)
    code, _, err = run_wavg("train-save", "--out-dir", tmp_path / "ckpt", "--epochs", 2)
    assert_one_line_error(
        code,
        err,
        "wavg train-save needs keras",
        "'.[keras]' in wavg's source folder",
        exit_code=EXIT_USAGE,
    )
    assert not (tmp_path / "ckpt").exists()


def test_help_lists_every_command_when_no_extra_is_installed(monkeypatch):
    for module in ("keras", "tensorflow", "jax", "sklearn", "matplotlib"):
        monkeypatch.setitem(sys.modules, module, None)
    code, out, err = run_wavg("--help")
    assert code == 0, err
    assert set(cli.commands) >= {"combine", "evaluate", "train-save"}
    for name in cli.commands:
        assert name in out
    code, out, _ = run_wavg("evaluate", "--help")
    assert code == 0 and "--schemes" in out


def test_combine_needs_no_extra(monkeypatch, tmp_path):
    for module in ("keras", "tensorflow", "jax", "sklearn", "matplotlib", "s3fs", "gcsfs"):
        monkeypatch.setitem(sys.modules, module, None)
    code, out, err = run_wavg("combine", *SAMPLES, "-o", tmp_path / "avg.h5", "--json")
    assert code == 0, err
    assert json.loads(out)["tensors"] > 0


def test_only_a_missing_module_of_the_extra_is_reported_as_a_missing_extra():
    expected = r"needs tensorstore.*pip install '\.\[orbax\]' in wavg's source folder"
    with pytest.raises(MissingExtra, match=expected), missing_reported("orbax", "wavg combine"):
        raise ModuleNotFoundError("No module named 'tensorstore'", name="tensorstore")
    # Any other failed import is a bug in wavg or a broken install: it must not be disguised.
    with pytest.raises(ModuleNotFoundError), missing_reported("keras", "wavg evaluate"):
        raise ModuleNotFoundError("No module named 'wavg.nothing'", name="wavg.nothing")


def test_the_keras_backend_is_read_as_keras_reads_it(monkeypatch, tmp_path):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert keras_backend() == "tensorflow"
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    assert keras_backend() == "jax"
    assert install_command("keras") == "pip install '.[keras-jax]'"
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert keras_backend() == "torch"
    assert install_command("keras", "torch") == "pip install torch"
    assert install_command("s3") == "pip install '.[s3]'"


def test_no_wavg_module_imports_tensorflow_except_to_make_it_deterministic():
    """Keras-side code goes through Keras (keras.ops, numpy); TensorFlow only for op
    determinism, and only when it is the backend (`wavg.workflows.train.make_deterministic`)."""
    package = Path(__file__).resolve().parents[2] / "wavg"
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        enclosing = {}
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef):
                for node in ast.walk(function):
                    enclosing.setdefault(node, function.name)  # outermost function wins
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(name.partition(".")[0] == "tensorflow" for name in names):
                found.append((path.name, enclosing.get(node, "<module>")))
    assert found == [("train.py", "make_deterministic")]


@pytest.mark.backend
def test_keras_side_commands_run_quietly_on_the_backend_keras_backend_selects(tmp_path):
    """train-save then evaluate in a fresh process, on the selected backend, with nothing on
    stderr (no native start-up lines, even when Keras imports TensorFlow lazily under JAX)."""
    backend = os.environ.get("KERAS_BACKEND") or "tensorflow"
    ckpt = tmp_path / "ckpt"
    script = (
        "import sys\n"
        "from wavg.cli import main\n"
        "args = ['train-save', '-q', '--epochs', '3', '--keep', '2', '--seed', '1', "
        f"'--out-dir', {str(ckpt)!r}]\n"
        "assert main(args) == 0\n"
        f"assert main(['evaluate', '--json', '--no-ensemble', {str(ckpt / 'model_1.h5')!r}, "
        f"{str(ckpt / 'model_2.h5')!r}]) == 0\n"
        "import keras\n"
        "print(keras.backend.backend(), file=sys.stderr)\n"
    )
    env = dict(os.environ, KERAS_BACKEND=backend, KERAS_HOME=str(tmp_path / "keras-home"))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user runs it
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"single", "equal", "linear", "exp"} <= set(json.loads(done.stdout)["columns"])
    assert done.stderr.splitlines() == [backend]


def test_importing_the_callback_without_keras_names_the_pip_install(
    monkeypatch, tensorflow_backend
):
    monkeypatch.setitem(sys.modules, "keras", None)
    monkeypatch.delitem(sys.modules, "wavg.keras", raising=False)
    with pytest.raises(
        ModuleNotFoundError, match=r"pip install '\.\[keras\]' in wavg's source folder"
    ):
        import wavg.keras  # noqa: F401
