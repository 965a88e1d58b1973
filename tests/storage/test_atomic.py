"""The atomic output context on its own: what a signal at the worst moment leaves behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from wavg.storage import atomic
from wavg.storage.atomic import TMP_MARKER, atomic_output


def test_an_interrupt_just_after_the_temporary_file_appears_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "avg.h5"
    out.write_bytes(b"previous")
    real_open = os.open

    def open_then_interrupt(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if TMP_MARKER in os.fspath(path):
            os.close(fd)
            raise KeyboardInterrupt  # what SIGINT (or wavg's SIGTERM handler) raises here
        return fd

    monkeypatch.setattr(atomic.os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt), atomic_output(out):
        pytest.fail("the block must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg.h5"]
    assert out.read_bytes() == b"previous"


def test_a_sigterm_during_cleanup_is_handled_after_the_temporary_files_are_gone(
    tmp_path, monkeypatch
):
    out = tmp_path / "avg.h5"
    seen: list[list[str]] = []
    real_glob = atomic.glob.glob

    def glob_then_signal(pattern):
        found = real_glob(pattern)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the files are being removed
        return found

    def note_leftovers(signum, frame):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))

    old_term = signal.signal(signal.SIGTERM, note_leftovers)
    try:
        with pytest.raises(RuntimeError), atomic_output(out) as tmp:
            Path(f"{tmp}-part").write_bytes(b"x")
            monkeypatch.setattr(atomic.glob, "glob", glob_then_signal)
            raise RuntimeError("the writer failed")
    finally:
        signal.signal(signal.SIGTERM, old_term)
    assert seen == [[]]
    assert list(tmp_path.iterdir()) == []
