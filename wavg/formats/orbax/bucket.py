"""Commit a new Orbax root to a bucket: the step's objects uploaded one by one, those that
make it a step last, and the run's claim beside the root from before the first upload until
the last, so that the next run removes what a killed one left.

A bucket has no rename and no request covers several objects, so what readers go by is the
step's markers: wavg recognises a step by ``pytree/_METADATA`` or ``_CHECKPOINT_METADATA``,
Orbax on object storage (its commit-file mode, the default on gs://) by ``commit_success.txt``.
They are uploaded after every array and the OCDBT manifest, in that order. As on disk the root
is new: a prefix holding anything but what a dead run left uncommitted is refused. This module
removes objects under the output prefix only when a claim says they are its run's and no step
there is committed, and never anything outside it but claims.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from wavg._runtime import signals_held
from wavg.errors import OutputError
from wavg.formats.orbax.steps import COMMIT_MARKER, PYTREE, STEP_METADATA
from wavg.storage.atomic import TMP_MARKER
from wavg.storage.bucket_target import BucketTarget
from wavg.storage.run_marker import run_is_dead, stamp

CLAIM_LIMIT = 4096  # bytes: a claim is a small JSON stamp


def last_objects(step: str) -> tuple[str, ...]:
    """The objects of step `step` uploaded last, in this order: what makes it a step for
    wavg, then Orbax's commit markers, the step's own the very last."""
    return (
        f"{step}/{PYTREE}/_METADATA",
        f"{step}/{STEP_METADATA}",
        f"{step}/{PYTREE}/{COMMIT_MARKER}",
        f"{step}/model_config/{COMMIT_MARKER}",
        f"{step}/{COMMIT_MARKER}",
    )


def committed(names: list[str]) -> bool:
    """Whether the objects `names` (relative to a root) hold a committed step."""
    return any(
        head.isdigit() and rest == COMMIT_MARKER
        for head, _, rest in (n.partition("/") for n in names)
    )


def _claims(target: BucketTarget) -> tuple[list[str], list[str]]:
    """The claims beside the output: those of dead runs, and those whose run may live."""
    pattern = re.compile(rf"\.{re.escape(target.name)}{re.escape(TMP_MARKER)}\d+-[0-9a-f]+")
    dead, live = [], []
    for name, size in target.entries().items():
        if not pattern.fullmatch(name) or size is None:
            continue
        body = target.read(name, CLAIM_LIMIT)
        verdict = run_is_dead(body) if body else None
        (dead if verdict else live).append(name)
    return dead, live


def check_new_root(target: BucketTarget) -> list[str]:
    """Refuse an output prefix that is not a new root: one that holds objects no dead run
    left uncommitted, or that another run is writing. Returns the dead runs' claims."""
    dead, live = _claims(target)
    if live:
        raise OutputError(target.display, f"another wavg run is writing it ({live[0]})")
    names = target.folder_names()
    if names and (committed(names) or not dead):
        raise OutputError(
            target.display,
            "exists; an Orbax output is a new directory (remove it or pick another name)",
        )
    return dead


@contextlib.contextmanager
def new_root(target: BucketTarget, step: str) -> Iterator[Path]:
    """Yield an empty local folder for the new root holding step `step`; on normal exit its
    files are uploaded under the output prefix, `last_objects(step)` last.

    First a dead run's leftovers are removed (its uncommitted objects, then its claim) and
    this run's claim is put; it is removed after the commit. If the block or the upload
    fails, the objects this run uploaded are removed, unless its step got committed.
    """
    dead = check_new_root(target)
    if dead:  # the prefix holds nothing committed, and only dead runs claim it
        target.remove_from_folder(target.folder_names() or [])
        for claim in dead:
            target.delete(claim)
    claim = f".{target.name}{TMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}"
    local: Path | None = None
    claimed = True  # from before the claim exists: a signal just after the put must remove it
    try:
        if not target.put(claim, stamp(writes=f"{target.name}/"), new=True):
            claimed = False
            raise OutputError(target.display, f"{claim} exists already")
        with target.new_folder(_still_new(target), last_objects(step), "directory") as local:
            yield local
    except BaseException:
        # Best effort: if the prefix cannot be listed, the claim stays for the next run.
        with signals_held(), contextlib.suppress(OutputError):
            ours = {p.relative_to(local).as_posix() for p in local.rglob("*")} if local else set()
            names = target.folder_names() or []
            if not committed(names):
                target.remove_from_folder(sorted(ours.intersection(names)))
            if claimed:
                target.delete(claim)
        raise
    target.delete(claim)


def _still_new(target: BucketTarget) -> Callable[[list[str] | None], None]:
    """The check `new_folder` makes before the upload: the prefix is still empty."""

    def check(names: list[str] | None) -> None:
        if names:
            raise OutputError(target.display, "was written by another run meanwhile")

    return check
