"""One budget of input files that may keep their descriptors open between reads.

A run may read a thousand inputs, or hundreds of shards times hundreds of inputs, under an
open-files limit of 1024 or less: a file beyond the budget reopens (and re-identifies) its
descriptor for each read instead. This module counts files, never opens one.
"""

from __future__ import annotations

import threading

# Descriptors left to everything else: the output, scratch files, pipes, libraries.
RESERVED = 64
# Descriptors an open input file may hold: its own, and h5py's when libhdf5 reads it too.
PER_FILE = 2
# Files kept open at most, also under a large limit (each costs kernel and libhdf5 memory).
MAX_OPEN_FILES = 4096
# The budget when the limit cannot be read.
FALLBACK = 64


def open_files_limit() -> int:
    """How many input files may keep descriptors open at once, over the whole process:
    ``(soft RLIMIT_NOFILE - RESERVED) // PER_FILE``, at most `MAX_OPEN_FILES`."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return FALLBACK
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN_FILES
    return max(0, min(MAX_OPEN_FILES, (soft - RESERVED) // PER_FILE))


class DescriptorBudget:
    """Files that may stay open, taken all at once by whoever opens them and given back on
    close. Thread-safe; sized from `open_files_limit` at first use unless `limit` is given."""

    def __init__(self, limit: int | None = None) -> None:
        self._lock = threading.Lock()
        self._left = limit

    def take(self, count: int) -> bool:
        """Reserve `count` open files; False (nothing reserved) when fewer are left."""
        with self._lock:
            if self._left is None:
                self._left = open_files_limit()
            if count > self._left:
                return False
            self._left -= count
            return True

    def give_back(self, count: int) -> None:
        """Return files reserved by `take` (0 for a refused reservation)."""
        with self._lock:
            if self._left is not None:
                self._left += count


# The process's budget: the averaging core reserves one file per input, a checkpoint of
# several files one more per part, so their sum never exceeds the limit.
OPEN_FILES = DescriptorBudget()
