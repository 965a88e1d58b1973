"""Exception types that the CLI turns into one-line messages and exit codes.

Every problem wavg can explain raises a `WavgError`; anything else reaching the CLI is a bug.
The message is complete on its own (it names the file and, where there is one, the tensor),
because the CLI prints exactly ``wavg: error: <message>`` and nothing more.
"""

from __future__ import annotations

import os

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class WavgError(Exception):
    """A failure wavg can explain in one line; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_FAILURE


class UsageError(WavgError):
    """The request itself is wrong (options, weights, file list), whatever the files hold."""

    exit_code = EXIT_USAGE


class CheckpointError(WavgError):
    """A checkpoint cannot be used: missing, unreadable, damaged or of an unknown layout."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint is refused because reading it could touch data outside it or run code."""


class CheckpointMismatch(CheckpointError):
    """Two checkpoints do not hold the same tensors, so they cannot be averaged."""


class NonFiniteValues(CheckpointError):
    """A weight tensor holds NaN or Inf (refused unless the caller allows it)."""


class InputChanged(CheckpointError):
    """A checkpoint changed while wavg was reading it (a training job still writing it)."""


class MetricsError(WavgError):
    """The logged metrics cannot rank the checkpoints: a metrics file that cannot be read,
    or a checkpoint with no value, a NaN value or an ambiguous name (`path` is named)."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutputError(WavgError):
    """The output cannot be written; nothing was left at the output path."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class CleanupWarning(UserWarning):
    """Tidying up after a committed output failed (an outage right after the commit): the
    new output is complete and the run succeeds; what is left, the next run for that output
    removes. Raised with `warnings.warn`; `combine` reports it among its warnings."""


class Interrupted(WavgError):
    """The run was stopped by a signal; the output path was left as it was."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        self.exit_code = exit_code
        super().__init__(f"interrupted by {signal_name}; no output was written")
