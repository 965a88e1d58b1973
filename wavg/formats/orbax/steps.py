"""Orbax checkpoint directories on disk: recognise roots and steps, list committed steps.

`keras.callbacks.OrbaxCheckpoint` writes a root directory of digit-named step directories;
this module finds the committed ones (oldest first) and watches a step's files for changes
while it is read. It reads directory listings and small marker files only: it never imports
TensorStore and never follows a symlink.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from wavg.errors import CheckpointError, InputChanged, UnsafeCheckpoint
from wavg.storage.locations import Url

TMP_SUFFIX = ".orbax-checkpoint-tmp"
COMMIT_MARKER = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"
PYTREE = "pytree"


class StepUrl(Url):
    """A URL found (by listing its bucket) to name one Orbax step: `open_checkpoint` reads
    it through TensorStore's kvstore drivers instead of as one object."""

    __slots__ = ()


def is_step(path: str | os.PathLike[str]) -> bool:
    """A directory that holds one Orbax step (``_CHECKPOINT_METADATA`` or ``pytree/``)."""
    p = Path(path)
    return p.is_dir() and ((p / STEP_METADATA).is_file() or (p / PYTREE / "_METADATA").is_file())


def is_root(path: str | os.PathLike[str]) -> bool:
    """A directory of Orbax steps: a digit-named step or an unfinished step inside."""
    p = Path(path)
    if not p.is_dir() or is_step(p):
        return False
    try:
        entries = list(os.scandir(p))
    except OSError:
        return False
    return any(
        e.name.endswith(TMP_SUFFIX) or (e.name.isdigit() and is_step(e.path)) for e in entries
    )


def expand_root(root: str) -> tuple[list[str], list[str]]:
    """The committed steps of the root `root`, oldest first, and one warning per step
    skipped as unfinished. A root with fewer than two committed steps is refused (see
    `check_enough`)."""
    steps, skipped = committed_steps(Path(root))
    check_enough(root, [step.name for step in steps])
    return [os.fspath(step) for step in steps], skipped


def check_enough(root: str, steps: list[str]) -> None:
    """Refuse a root with fewer than two committed steps: there is nothing to average, and
    the usual cause is OrbaxCheckpoint's default ``max_to_keep=1``."""
    if len(steps) < 2:
        found = f" ({steps[0]})" if steps else ""
        raise CheckpointError(
            root,
            f"holds {len(steps)} committed Orbax step(s){found}; averaging needs two or "
            "more: train with OrbaxCheckpoint(..., max_to_keep=N) to keep the last N "
            "(its default max_to_keep=1 keeps only the newest)",
        )


def committed_steps(root: Path) -> tuple[list[Path], list[str]]:
    """The committed steps of `root` by step number, and a warning per skipped entry.

    A step is unfinished when it still has Orbax's temporary name, or when it lacks the
    ``commit_success.txt`` that the other steps of the root carry (Orbax marks completion
    with it where it cannot rename, e.g. on object stores).
    """
    candidates: list[Path] = []
    skipped: list[str] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.endswith(TMP_SUFFIX):
            skipped.append(f"{entry.path}: skipped, an unfinished Orbax step (being written?)")
        elif entry.name.isdigit() and entry.is_symlink():
            raise UnsafeCheckpoint(
                entry.path, "is a symlink; Orbax steps must be plain directories"
            )
        elif entry.name.isdigit() and entry.is_dir():
            candidates.append(Path(entry.path))
    marked = any((step / COMMIT_MARKER).is_file() for step in candidates)
    steps = []
    for step in candidates:
        if not is_step(step):
            skipped.append(f"{step}: skipped, not an Orbax step")
        elif marked and not (step / COMMIT_MARKER).is_file():
            skipped.append(f"{step}: skipped, no {COMMIT_MARKER} (an unfinished Orbax step)")
        else:
            steps.append(step)
    return sorted(steps, key=lambda s: int(s.name)), skipped


class StepFiles:
    """The files of one step directory, checked to be plain and watched for changes.

    The step's `InputSource` (wavg.storage.bytesource): a training job may delete
    or rewrite an old step (``max_to_keep``) while wavg reads it, so the identity of every
    file (inode, size, mtime) is recorded when the step is opened and compared at the end.
    A symlink or special file anywhere in the step is refused: a step must not lead outside
    itself.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.keep_open = True
        self.bytes_fetched = 0  # from object storage: none, a step is local
        self.requests = 0
        self.identity = self._walk()
        self.size = sum(size for _, _, size, _ in self.identity.values())

    def _walk(self) -> dict[str, tuple[int, int, int, int]]:
        found: dict[str, tuple[int, int, int, int]] = {}
        pending = [self.path]
        while pending:
            directory = pending.pop()
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                raise InputChanged(self.path, "disappeared while it was being read") from None
            except OSError as exc:
                raise CheckpointError(directory, f"cannot list ({exc.strerror})") from None
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafeCheckpoint(
                        entry.path, "is a symlink; an Orbax step must not lead outside itself"
                    )
                if stat.S_ISDIR(st.st_mode):
                    pending.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    found[entry.path] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                else:
                    raise UnsafeCheckpoint(entry.path, "is not a regular file")
        return found

    @property
    def name(self) -> str:
        """The step's number, as its directory is named."""
        return os.path.basename(self.path.rstrip(os.sep))

    def file_keys(self) -> list[str]:
        """The step's files, relative to it, with ``/`` separators, sorted."""
        return sorted(Path(p).relative_to(self.path).as_posix() for p in self.identity)

    def read(self, key: str) -> bytes | None:
        """The bytes of the step's file `key`, or None if it does not exist."""
        try:
            return (Path(self.path) / key).read_bytes()
        except FileNotFoundError:
            return None

    def kvstore(self, key: str) -> dict:
        """A TensorStore kvstore spec for the step's directory `key` (a JSON spec, not a
        URL: a URL would percent-decode a path holding ``%`` or stop at a ``#``)."""
        return {"driver": "file", "path": f"{(Path(self.path) / key).resolve()}/"}

    def context(self) -> dict:
        """TensorStore context resources the step's kvstore needs (none, locally)."""
        return {}

    def check_unchanged(self) -> None:
        """Raise `InputChanged` if any file of the step was added, removed or rewritten."""
        if not os.path.isdir(self.path):
            raise InputChanged(self.path, "disappeared while it was being read")
        if self._walk() != self.identity:
            raise InputChanged(self.path, "changed while it was being read")

    def release(self) -> None:
        """Nothing to give back: TensorStore opens the step's files per read."""
