"""Commit an output folder (an unzipped ``.keras`` model, an Orbax root), locally or in a bucket.

The target is checked first (a model folder replaces only an empty place or another model
folder, one holding config.json); the new folder is built whole, then replaces the old one:
locally in one swap, in a bucket file by file with `last` (config.json, what Keras reads
first) uploaded last and then the objects the new folder lacks deleted (see the targets in
`wavg.storage`). This module never removes anything outside the output folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from wavg.errors import OutputError
from wavg.formats.layouts import CONFIG
from wavg.storage.target import target_for


def check_model_folder(out: Path) -> None:
    """Fail before any input is read if `out` cannot become a model folder wavg may replace."""
    target = target_for(out)
    _refuse_unless_model(target.display)(target.folder_names())


def _refuse_unless_model(display: str) -> Callable[[list[str] | None], None]:
    def check(names: list[str] | None) -> None:
        if names and CONFIG not in names:
            raise OutputError(
                display,
                "exists and is not a Keras model folder (no config.json); wavg replaces only those",
            )

    return check


@contextlib.contextmanager
def folder_output(
    out: Path,
    check: Callable[[list[str] | None], None] | None = None,
    last: Sequence[str] = (CONFIG,),
    kind: str = "folder",
) -> Iterator[Path]:
    """Yield an empty local folder; on normal exit it becomes the output folder `out`.

    The caller writes and fsyncs every file in it; in a bucket the files named in `last`
    are uploaded last, in that order. `check` judges the names the output folder holds
    (None: no folder yet) before anything is written, and in a bucket again just before the
    upload; by default only a model folder may be replaced. `kind` names the output in
    errors ("folder", "directory").
    """
    target = target_for(out)
    if check is None:
        check = _refuse_unless_model(target.display)
    with target.new_folder(check, last, kind) as tmp:
        yield tmp
