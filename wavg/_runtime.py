"""Process-wide settings of a wavg run: held signals, and one BLAS thread for the CLI.

Signals. wavg's CLI turns both signals into exceptions raised wherever the main thread happens to be.
That is how a run unwinds and removes its temporary files, but two places must not be
interrupted midway: removing those files, and starting a worker thread (a signal handled
while `Thread.start` waits breaks threading's bookkeeping and the thread dies printing a
traceback). This module only defers signals; it never ignores one.

BLAS threads. numpy's bundled OpenBLAS starts a thread per core when numpy is imported, and
each spins, waiting for work, for a while before it sleeps. ``wavg combine`` makes no BLAS
call, so on the two cores it targets that spinning took about 0.1 s of CPU per run from
start-up and the averaging workers (a sixth of all CPU time on ResNet50 checkpoints). The
CLI asks for one thread before numpy loads (`one_blas_thread`); a user's own
``OPENBLAS_NUM_THREADS`` wins, and the library itself (``import wavg``) changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then raise them again.

    A thread's signal mask would not do: Python runs handlers in the main thread whichever
    thread the kernel picked, so the handlers themselves are swapped for a recorder. Only
    the main thread may do that; elsewhere the block runs unguarded.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {
        sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in held
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


def one_blas_thread() -> None:
    """Ask numpy's OpenBLAS for one thread unless the user chose; call before numpy loads."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
