"""The claim stamp a multi-object commit puts beside its output, and the rule that judges
whether the run that wrote it is dead (what lets the next run remove its leftovers)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from hypothesis import given
from hypothesis import strategies as st

from wavg.storage.run_marker import STAMP_TTL, run_is_dead, stamp


def _gone_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(done.stdout)


def _stamp(host: str, pid: int, started: float) -> bytes:
    return json.dumps({"host": host, "pid": pid, "started": started}).encode()


def test_this_runs_own_stamp_is_alive_and_carries_the_protocols_fields():
    body = stamp(writes="avg/")
    assert run_is_dead(body) is False
    assert json.loads(body)["writes"] == "avg/"


def test_a_gone_process_on_this_host_is_dead_at_once():
    assert run_is_dead(_stamp(socket.gethostname(), _gone_pid(), time.time())) is True


def test_another_hosts_run_is_judged_by_age_alone():
    pid = _gone_pid()  # gone here, which says nothing about the other host
    assert run_is_dead(_stamp("elsewhere.invalid", pid, time.time())) is False
    old = time.time() - STAMP_TTL - 60
    assert run_is_dead(_stamp("elsewhere.invalid", pid, old)) is True


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@given(
    st.binary(max_size=64).filter(lambda b: not _is_json(b))
    | JSON.map(lambda v: json.dumps(v).encode())
)
def test_bytes_that_are_no_stamp_are_never_judged(body):
    """None for anything but a stamp (bytes, or JSON lacking a stamp's fields): its writer
    is not wavg's to judge, and judging it never raises."""
    found = json.loads(body) if _is_json(body) else None
    if isinstance(found, dict) and {"host", "pid", "started"} <= found.keys():
        return  # (text keys drawn as a stamp's: judged, as a stamp)
    assert run_is_dead(body) is None


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True
