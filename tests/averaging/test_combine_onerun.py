"""combine warns when its inputs do not look like epochs of one training run.

The distance of each input to the newest is measured during the averaging pass, on a
sample of the weights; the limit is the one `wavg evaluate` uses (wavg.averaging.onerun).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from support.kerasfiles import run_wavg, short_run

import wavg
from wavg.averaging.onerun import SPREAD_LIMIT, distance_warnings

WARNING = "differs from the newest checkpoint"


def test_one_runs_last_epochs_combine_without_a_one_run_warning(tmp_path):
    summary = wavg.combine(short_run(), tmp_path / "avg.h5")
    assert not [w for w in summary.warnings if WARNING in w]


def test_independently_trained_models_warn_on_stderr_and_in_json(tmp_path):
    a, b = short_run(seed=1)[-1], short_run(seed=5)[-1]
    shutil.copy(a, tmp_path / "model_1.h5")
    shutil.copy(b, tmp_path / "model_2.h5")
    out = tmp_path / "avg.h5"
    code, stdout, stderr = run_wavg(
        "combine", tmp_path / "model_1.h5", tmp_path / "model_2.h5", "-o", out, "--json"
    )
    assert code == 0, stderr
    assert f"wavg: warning: model_1.h5 {WARNING}" in " ".join(stderr.split())
    warnings = json.loads(stdout)["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith(f"model_1.h5 {WARNING}, model_2.h5")
    assert out.exists()  # a warning, not a refusal


def _weights_file(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        for name, value in tensors.items():
            f.create_dataset(f"layers/{name}/vars/0", data=value)
    return path


@pytest.mark.parametrize("relative", [0.05, 0.2, 0.3, 0.9])
def test_the_sampled_distance_is_close_to_the_exact_one(tmp_path, relative):
    rng = np.random.default_rng(int(relative * 100))
    shapes = {"big": (300, 700), "mid": (4096,), "small": (7,), "scalar": ()}
    newest = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    size = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in newest.values()))
    noise = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in noise.values()))
    other = {
        n: (newest[n] + noise[n] * (relative * size / norm)).astype(np.float32) for n in shapes
    }
    exact = np.sqrt(
        sum(float(np.sum((other[n] - newest[n]).astype(np.float64) ** 2)) for n in shapes)
    )
    files = [
        _weights_file(tmp_path / "m_1.weights.h5", other),
        _weights_file(tmp_path / "m_2.weights.h5", newest),
    ]
    summary = wavg.combine(files, tmp_path / "avg.weights.h5")
    found = [w for w in summary.warnings if WARNING in w]
    assert bool(found) == (exact / size > SPREAD_LIMIT)
    if found:
        reported = float(found[0].split(" by ")[1].split("%")[0]) / 100
        assert abs(reported - exact / size) < 0.02


def test_the_limit_is_evaluates_and_an_input_exactly_at_it_is_not_named():
    paths = [Path("m_1.h5"), Path("m_2.h5"), Path("m_3.h5")]
    at_limit = SPREAD_LIMIT**2
    assert distance_warnings(paths, [at_limit, 0.0, 0.0], 1.0) == []
    (warning,) = distance_warnings(paths, [at_limit * 1.1, at_limit * 1.2, 0.0], 1.0)
    assert warning.startswith("m_2.h5 (and 1 more) differs from the newest checkpoint, m_3.h5")
    assert distance_warnings(paths, [float("nan"), 0.0, 0.0], 1.0) == []
    assert distance_warnings(paths, [1.0, 0.0, 0.0], 0.0) == []
