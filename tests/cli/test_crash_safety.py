"""The output path only ever holds the previous file or a complete new one.

A real ``wavg combine`` of four ~60 MB checkpoints is killed with SIGKILL at random moments,
stopped with SIGTERM and SIGINT, and run out of file-size budget; the output is then checked
byte for byte (previous file) or value for value (new file), and leftover temporary files
must be wavg's own and be removed by the next run.
"""

from __future__ import annotations

import errno
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from support import safety as hs

import wavg
from wavg.errors import OutputError, UsageError

BIG_SHAPE = (3900, 3900)  # 60.8 MB of float32
KILL_TRIALS = 25


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> list[Path]:
    return hs.samples(tmp_path_factory)


@pytest.fixture(scope="session")
def big(tmp_path_factory, samples) -> tuple[list[Path], dict[str, np.ndarray]]:
    """Four legacy-.h5 checkpoints of ~60 MB (a real Keras file plus one large kernel)."""
    directory = tmp_path_factory.mktemp("big")
    inputs = []
    for i in range(4):
        path = directory / f"model_{i + 1}.h5"
        shutil.copy(samples[-1 - i], path)
        rng = np.random.default_rng(i)
        with h5py.File(path, "r+") as h5:
            group = h5["model_weights"].create_group("big")
            group.create_dataset("kernel", data=rng.standard_normal(BIG_SHAPE, dtype="f4"))
        inputs.append(path)
    return inputs, hs.reference_average(inputs)


def assert_complete_average(out: Path, reference: dict[str, np.ndarray]) -> None:
    got = hs.h5_tensors(out)
    assert set(got) == set(reference)
    for name, value in reference.items():
        np.testing.assert_allclose(got[name], value, rtol=2e-6, atol=1e-7, err_msg=name)


def stat_inputs(inputs: list[Path]) -> list[tuple[int, int]]:
    return [(p.stat().st_size, p.stat().st_mtime_ns) for p in inputs]


def start(inputs: list[Path], out: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [*hs.WAVG, "combine", *map(str, inputs), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for_temp(directory: Path, proc: subprocess.Popen, limit: float = 30) -> bool:
    """Wait until the run has created its temporary file (True) or has ended (False)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if hs.leftovers(directory):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("the run neither started writing nor ended")


def test_kill_9_at_random_moments_leaves_the_previous_file_or_a_complete_one(big, tmp_path):
    inputs, reference = big
    before = hs.snapshot(inputs)
    out = tmp_path / "avg.h5"
    previous = b"previous output\n" * 1000
    rng = random.Random(20240605)
    outcomes = {"previous": 0, "complete": 0}
    killed: list[int] = []
    for trial in range(KILL_TRIALS):
        if not out.exists() or out.stat().st_size != len(previous):
            out.write_bytes(previous)
        stats = stat_inputs(inputs)
        proc = start(inputs, out)
        if trial % 2:  # somewhere in the whole run, start-up included
            time.sleep(rng.uniform(0.0, 0.8))
        elif wait_for_temp(tmp_path, proc):  # somewhere while it writes
            time.sleep(rng.uniform(0.0, 0.25))
        proc.kill()
        proc.communicate()
        if out.read_bytes() == previous:
            outcomes["previous"] += 1
        else:
            assert_complete_average(out, reference)
            outcomes["complete"] += 1
        # Only wavg's own temporary files, of runs that were killed, may be left.
        killed.append(proc.pid)
        pids = "|".join(map(str, killed))
        pattern = re.compile(rf"\.avg\.h5\.wavg-tmp-({pids})-[0-9a-f]+(-weights\.h5)?")
        left = hs.leftovers(tmp_path)
        assert all(pattern.fullmatch(name) for name in left), left
        assert sorted(p.name for p in tmp_path.iterdir() if ".wavg-tmp-" not in p.name) == [
            "avg.h5"
        ]
        assert stat_inputs(inputs) == stats
    # The next run removes what the killed ones left, and writes the average.
    result = hs.run_wavg(["combine", *inputs, "-o", out])
    assert result.code == 0, result.stderr
    assert hs.leftovers(tmp_path) == []
    assert_complete_average(out, reference)
    hs.assert_unchanged(before)
    assert outcomes["previous"] + outcomes["complete"] == KILL_TRIALS
    assert outcomes["previous"] > 0
    print(f"kill -9 trials: {outcomes}")


# The real CLI in a child process that signals itself right after its first block is
# written: the signal always lands mid-write, however fast or busy the machine.
_SIGNAL_MID_WRITE = """
import os, signal, sys
# Ctrl-C's handler, as a terminal's child has it: a job started in the background (as CI
# runners may start the suite) inherits SIGINT ignored, and Python then keeps ignoring it.
signal.signal(signal.SIGINT, signal.default_int_handler)
import wavg.formats.h5file as h5file
real = h5file.H5Writer.write
def write_then_signal(self, *args):
    real(self, *args)
    os.kill(os.getpid(), signal.{name})
h5file.H5Writer.write = write_then_signal
from wavg.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "interrupt")]
)
def test_sigterm_and_sigint_stop_cleanly_and_keep_the_previous_output(
    sig, code, word, big, tmp_path
):
    inputs, _ = big
    out = tmp_path / "avg.h5"
    out.write_bytes(b"previous")
    stats = stat_inputs(inputs)
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_MID_WRITE.format(name=sig.name), "combine"]
        + [*map(str, inputs), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == code, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("wavg: error:")]
    assert len(errors) == 1 and word in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert out.read_bytes() == b"previous"
    assert hs.leftovers(tmp_path) == []
    assert stat_inputs(inputs) == stats


@pytest.mark.parametrize("limit", [0, 4096, 20 << 20, 60_000_000])
def test_a_file_size_limit_is_a_clean_error_and_keeps_the_previous_output(limit, big, tmp_path):
    inputs, _ = big
    out = tmp_path / "avg.h5"
    out.write_bytes(b"previous")
    stats = stat_inputs(inputs)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = start(inputs, out, preexec_fn=limit_file_size)
    _, stderr = proc.communicate(timeout=120)
    result = hs.Result(proc.returncode, "", stderr)
    line = hs.assert_one_line_error(result, [out])
    assert "too large" in line.lower() or "file size" in line.lower(), line
    assert out.read_bytes() == b"previous"
    assert hs.leftovers(tmp_path) == []
    assert stat_inputs(inputs) == stats


@pytest.mark.parametrize(
    ("call", "err"),
    [("pwrite", errno.ENOSPC), ("fsync", errno.EIO), ("replace", errno.EXDEV)],
)
def test_disk_errors_while_writing_keep_the_previous_output(
    call, err, samples, tmp_path, monkeypatch
):
    inputs = samples[-3:]
    out = tmp_path / "avg.h5"
    out.write_bytes(b"previous")
    real = getattr(os, call)

    def failing(*args, **kwargs):
        target = args[0] if call != "replace" else args[1]
        if call == "replace" and Path(target) != out:
            return real(*args, **kwargs)
        if call == "fsync" and not isinstance(target, int):
            return real(*args, **kwargs)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, call, failing)
    with hs.inputs_untouched(inputs), pytest.raises(OutputError) as info:
        wavg.combine(inputs, out)
    message = str(info.value)
    assert str(out) in message and os.strerror(err) in message and "\n" not in message
    assert out.read_bytes() == b"previous"
    assert hs.leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# the output path


@pytest.mark.parametrize("how", ["same_path", "symlink", "hard_link"])
def test_an_output_that_is_one_of_the_inputs_is_refused(how, samples, tmp_path, capfd):
    inputs = []
    for src in samples[-3:]:
        shutil.copy(src, tmp_path / src.name)
        inputs.append(tmp_path / src.name)
    victim = inputs[1]
    if how == "same_path":
        out = victim
    else:
        out = tmp_path / "avg.h5"
        if how == "symlink":
            out.symlink_to(victim)
        else:
            os.link(victim, out)
    with hs.inputs_untouched(inputs):
        result = hs.run_cli(["combine", *inputs, "-o", out], capfd)
        with pytest.raises(UsageError):
            wavg.combine(inputs, out)
    hs.assert_one_line_error(result, [out, victim], code=2)
    assert hs.leftovers(tmp_path) == []


def test_the_same_input_given_twice_is_a_usage_error(samples, tmp_path, capfd):
    link = tmp_path / "model_500.h5"
    link.symlink_to(samples[-1])
    inputs = [samples[-2], samples[-1], link]
    with hs.inputs_untouched(inputs[:2]):
        result = hs.run_cli(["combine", *inputs, "-o", tmp_path / "avg.h5"], capfd)
    hs.assert_one_line_error(result, [samples[-1], link], code=2)
    hs.assert_no_output(tmp_path / "avg.h5")


@pytest.mark.parametrize("case", ["missing_dir", "dir_is_a_file", "output_is_a_dir"])
def test_an_output_that_cannot_be_a_file_is_refused_before_reading(case, samples, tmp_path, capfd):
    if case == "missing_dir":
        out = tmp_path / "no" / "such" / "avg.h5"
    elif case == "dir_is_a_file":
        (tmp_path / "file").write_bytes(b"x")
        out = tmp_path / "file" / "avg.h5"
    else:
        out = tmp_path / "avg.h5"
        out.mkdir()
    inputs = samples[-2:]
    with hs.inputs_untouched(inputs):
        result = hs.run_cli(["combine", *inputs, "-o", out], capfd)
    hs.assert_one_line_error(result, [out])
    assert not (tmp_path / "no").exists()
    assert hs.leftovers(tmp_path) == []


def test_an_unwritable_output_directory_is_a_clean_error(samples, tmp_path):
    # Root writes anywhere, so the run drops root's permission-override capabilities.
    inputs = []
    for src in samples[-2:]:
        shutil.copy(src, tmp_path / src.name)
        inputs.append(tmp_path / src.name)
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    out = out_dir / "avg.h5"
    before = hs.snapshot(inputs)
    try:
        result = hs.run_wavg(["combine", *inputs, "-o", out], unprivileged=True)
        line = hs.assert_one_line_error(result, [out])
        assert "Permission denied" in line or "permission denied" in line
        assert list(out_dir.iterdir()) == []
        hs.assert_unchanged(before)
    finally:
        out_dir.chmod(0o755)
