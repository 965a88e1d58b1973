"""The Python API without traps (issue 22): one path or glob is one input, anything else
that is not a list of names is a TypeError naming the parameter, and `dir(wavg)` and the
documented modules are there after a plain ``import wavg``, which still loads no numpy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.reference import SAMPLES

import wavg


def test_one_glob_string_or_path_is_one_input_spec(tmp_path):
    pattern = f"{SAMPLES}/model_49*.h5"
    listed = sorted(SAMPLES.glob("model_49*.h5"))
    assert wavg.plan_combine(pattern).inputs == wavg.plan_combine(listed).inputs == listed
    summary = wavg.combine(pattern, tmp_path / "avg.h5", scheme="linear")
    assert summary.inputs == listed and (tmp_path / "avg.h5").is_file()
    assert wavg.plan_combine(listed[-1]).inputs == [listed[-1]]
    assert wavg.order_checkpoints("ckpt/model_7.h5") == [Path("ckpt/model_7.h5")]


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (b"ckpt/model_49*.h5", "paths must be a path, URL or glob .* not bytes"),
        (7, "paths must be .* not int"),
        (None, "paths must be .* not NoneType"),
        ([f"{SAMPLES}/model_499.h5", b"model_498.h5"], r"paths\[1\] must be a str .* not bytes"),
    ],
)
def test_what_is_no_list_of_names_is_a_type_error_naming_the_parameter(paths, message, tmp_path):
    for call in (
        lambda: wavg.combine(paths, tmp_path / "avg.h5"),
        lambda: wavg.plan_combine(paths),
        lambda: wavg.order_checkpoints(paths),
    ):
        with pytest.raises(TypeError, match=message):
            call()
    assert not (tmp_path / "avg.h5").exists()


def test_dir_lists_the_public_api_and_the_documented_modules_are_reachable():
    code = (
        "import sys, wavg; print(' '.join(dir(wavg))); "
        "print(wavg.errors.UsageError.exit_code, 'numpy' in sys.modules); "
        "print(*(m.__name__ for m in (wavg.bn_update, wavg.soup, wavg.evaluate, wavg.train)))"
    )
    lines = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert lines[0].split() == sorted(
        [*wavg.__all__, "__version__", "bn_update", "errors", "evaluate", "soup", "train"]
    )
    assert lines[1] == "2 False"
    assert lines[2].split() == [
        f"wavg.workflows.{name}" for name in ("bn_update", "soup", "evaluate", "train")
    ]


def test_run_plan_to_another_format_than_the_inputs_is_one_clear_usage_error(tmp_path):
    plan = wavg.plan_combine(f"{SAMPLES}/model_49*.h5")
    with pytest.raises(wavg.WavgError, match=r"output .*avg\.keras must end in \.h5 or \.hdf5"):
        wavg.run_plan(plan, tmp_path / "avg.keras", dry_run=True)
    assert wavg.run_plan(plan, tmp_path / "avg.h5", dry_run=True).format == "h5"
