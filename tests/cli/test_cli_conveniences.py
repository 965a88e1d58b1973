"""What people expect of a CLI in a shell, a Makefile or CI (issue 22): -q on every command,
-V, ``python -m wavg``, shell completion, whole help texts, and one error line when stdout
cannot be written (a full disk, a closed pipe), saying whether the output was written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from support.reference import SAMPLES

from wavg import __version__
from wavg.cli import cli

INPUTS = f"{SAMPLES}/model_49*.h5"


def invoke(*args: object, **env: str):
    return CliRunner(env={"COLUMNS": "80", **env}).invoke(cli, [str(a) for a in args])


def wavg_process(*args: object, stdout=subprocess.PIPE, **env: str) -> subprocess.CompletedProcess:
    """``python -m wavg ARGS`` in a process of its own (the worktree's wavg: PYTHONPATH)."""
    return subprocess.run(
        [sys.executable, "-m", "wavg", *map(str, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        check=False,
        timeout=120,
    )


def test_every_command_has_a_whole_summary_quiet_and_help():
    listing = invoke("--help").stdout
    commands = listing.split("Commands:\n", 1)[1].splitlines()
    assert len(commands) == len(cli.commands)
    for name, command in cli.commands.items():
        whole = command.get_short_help_str(limit=10**6)  # what click shows, never cut
        assert any(line.split(None, 1)[1:] == [whole] for line in commands), listing
        page = invoke(name, "--help")
        assert page.exit_code == 0, page.output
        assert re.search(r"-q, --quiet\s", page.stdout) or "--quiet, -q" in page.stdout, name
    assert not any(line.rstrip().endswith("...") for line in commands)


@pytest.mark.parametrize("name", ["evaluate", "bn-update", "soup"])
def test_data_help_names_every_built_in_data_set(name):
    option = next(p for p in cli.commands[name].params if p.name == "data")
    assert "'blobs'" in option.help and "'digits'" in option.help and "npz" in option.help


def test_combine_help_says_what_a_checkpoint_may_be_and_evaluate_takes_order():
    page = " ".join(invoke("combine", "--help").stdout.split())
    for what in ("quoted glob", "s3:// or gs:// URL", "unzipped .keras model", "Orbax"):
        assert what in page
    evaluate_order = next(p for p in cli.commands["evaluate"].params if p.name == "order")
    combine_order = next(p for p in cli.commands["combine"].params if p.name == "order")
    assert isinstance(evaluate_order.type, click.Choice)
    assert evaluate_order.type.choices == combine_order.type.choices
    assert evaluate_order.default == combine_order.default == "natural"


def test_quiet_combine_prints_nothing_but_json_when_asked(tmp_path):
    quiet = invoke("combine", INPUTS, "-o", tmp_path / "avg.h5", "-q")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert (tmp_path / "avg.h5").is_file()
    as_json = invoke("combine", INPUTS, "-o", tmp_path / "avg.h5", "--quiet", "--json")
    assert as_json.exit_code == 0 and as_json.stderr == ""
    assert json.loads(as_json.stdout)["output"] == str(tmp_path / "avg.h5")
    refused = invoke("combine", INPUTS, "-o", tmp_path / "avg.keras", "-q")
    assert refused.exit_code == 2 and refused.stderr.startswith("wavg: error: ")


def test_version_python_m_and_completion_scripts():
    assert wavg_process("-V").stdout == f"wavg, version {__version__}\n"
    done = wavg_process("--help")
    assert done.returncode == 0 and done.stdout.startswith("Usage: wavg ")
    scripts = {"bash": "_wavg_completion()", "zsh": "#compdef wavg", "fish": "--command wavg"}
    for shell, marker in scripts.items():
        done = wavg_process(_WAVG_COMPLETE=f"{shell}_source")
        assert done.returncode == 0 and marker in done.stdout, (shell, done.stderr)
    done = wavg_process(_WAVG_COMPLETE="bash_complete", COMP_WORDS="wavg bn", COMP_CWORD="1")
    assert done.stdout.split() == ["plain,bn-update"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_stdout_is_one_error_line_saying_the_output_was_written(tmp_path):
    out = tmp_path / "avg.h5"
    with open("/dev/full", "w") as full:
        done = wavg_process("combine", INPUTS, "-o", out, stdout=full)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1:] == [
        f"wavg: error: could not write the summary to stdout (No space left on device); "
        f"{out} was written"
    ]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert out.is_file()
    with open("/dev/full", "w") as full:
        done = wavg_process("combine", INPUTS, "-o", tmp_path / "dry.h5", "--dry-run", stdout=full)
    assert done.returncode == 1 and done.stderr.endswith("; no file was written\n")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["--help"], ["-V"], ["combine", "--help"]])
def test_help_or_version_to_a_full_stdout_is_one_error_line(args):
    with open("/dev/full", "w") as full:
        done = wavg_process(*args, stdout=full)
    assert done.returncode == 1
    assert done.stderr == (
        "wavg: error: could not write the help or version to stdout (No space left on device); "
        "no file was written\n"
    )


def test_a_closed_pipe_is_one_error_line_saying_the_output_was_written(tmp_path):
    out = tmp_path / "avg.h5"
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before wavg writes: `wavg ... | head -c0`
    try:
        done = wavg_process("combine", INPUTS, "-o", out, "--json", "-q", stdout=writer)
    finally:
        os.close(writer)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"wavg: error: could not write the summary to stdout (Broken pipe); {out} was written"
    ]
    assert out.is_file()
