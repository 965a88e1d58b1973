"""A run's claim on an output it writes object by object: a small JSON stamp, and the rule
that says when the run that wrote it is dead.

A commit that no single request covers puts such a stamp beside its output first and
removes it last, so a run killed in between leaves a claim the next run can judge. This
module knows no format and no target: what a dead run's objects are is the protocol's.
"""

from __future__ import annotations

import json
import os
import socket
import time

from wavg.storage.atomic import process_alive

# A stamp older than this is a dead run's whatever host wrote it (no combine runs for a
# day); on the host that wrote it, a gone process says so at once.
STAMP_TTL = 24 * 3600


def stamp(**extra: object) -> bytes:
    """This run's stamp: the writing ``host``, ``pid`` and ``started`` (Unix time), and
    `extra` fields for the protocol."""
    fields = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    return json.dumps({**fields, **extra}).encode()


def run_is_dead(body: bytes) -> bool | None:
    """Whether the run that wrote the stamp `body` is dead: written more than `STAMP_TTL`
    ago, or on this host by a process that is gone. None if `body` is not a stamp."""
    try:
        found = json.loads(body)
        started, host, pid = float(found["started"]), str(found["host"]), int(found["pid"])
    except (ValueError, RecursionError, KeyError, TypeError):
        return None
    gone = host == socket.gethostname() and not process_alive(pid)
    return gone or time.time() - started > STAMP_TTL
