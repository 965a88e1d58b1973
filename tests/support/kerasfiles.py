"""Helpers shared by the Keras-based tests: run the CLI in-process, make tiny real checkpoints.

Training runs are cached per process, so the whole suite trains each small run once.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from wavg.cli import main


def run_wavg(*args: object) -> tuple[int, str, str]:
    """Run ``wavg ARGS`` through the real entry point; return (exit code, stdout, stderr)."""
    with CliRunner().isolation() as (out, err, _):
        code = main([str(arg) for arg in args])
    return code, out.getvalue().decode(), err.getvalue().decode()


def assert_one_line_error(code: int, stderr: str, *words: str, exit_code: int = 1) -> None:
    """The CLI's contract for a failure it can explain: one line, an exit code, no traceback."""
    lines = stderr.strip().splitlines()
    assert code == exit_code, stderr
    assert len(lines) == 1 and lines[0].startswith("wavg: error: "), stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], lines[0]


def scratch_dir(prefix: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


@functools.cache
def short_run(seed: int = 1, epochs: int = 12, keep: int = 4, fmt: str = "h5") -> tuple[Path, ...]:
    """The case-study model trained briefly; its last `keep` checkpoints, oldest first."""
    from wavg.workflows.train import train_save

    out = scratch_dir(f"wavg-run-{seed}-{fmt}-")
    return tuple(train_save(out, epochs=epochs, keep=keep, seed=seed, fmt=fmt).files)


@functools.cache
def digits_run() -> tuple:
    """Three epochs of the built-in Conv+BN digits model at a high learning rate."""
    from wavg.workflows.train import train_save

    out = scratch_dir("wavg-digits-")
    result = train_save(
        out, data="digits", epochs=3, keep=3, seed=1, optimizer="sgd", learning_rate=0.05
    )
    return tuple(result.files)


def tiny_model(keras: Any, features: int = 2, outputs: int = 3) -> Any:
    """A small compiled classifier for callback tests (not the case-study model)."""
    net = keras.Sequential(
        [
            keras.Input(shape=(features,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(outputs, activation="softmax"),
        ]
    )
    net.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return net
