"""Signals at the worst moments: while worker threads start, and while temporary files go."""

from __future__ import annotations

import importlib
import os
import signal
import threading

import pytest

core = importlib.import_module("wavg.averaging.engine")


class Stop(Exception):
    """What wavg's CLI raises on SIGTERM (the test's own, to tell it apart)."""


def test_a_sigterm_while_a_worker_thread_starts_is_handled_once_the_pool_runs(monkeypatch):
    real_start = threading._start_new_thread
    started: list[int] = []
    at_signal: list[int] = []

    def start_with_a_signal(*args, **kwargs):
        started.append(real_start(*args, **kwargs))
        # Handled at the next bytecode, still inside Thread.start: the moment that broke it.
        os.kill(os.getpid(), signal.SIGTERM)
        return started[-1]

    def stop(signum, frame):
        at_signal.append(len(started))
        raise Stop

    previous = signal.signal(signal.SIGTERM, stop)
    monkeypatch.setattr(threading, "_start_new_thread", start_with_a_signal)
    try:
        with pytest.raises(Stop):
            core._started_pool(2)
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, previous)
    # Handled once, after both workers had started (unguarded: during the first start,
    # which then left threading's bookkeeping broken and the thread printing a traceback).
    assert at_signal == [2]
