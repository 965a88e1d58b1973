"""Where an output is committed: a local directory or an object-store prefix, behind one
`Target` interface that the formats' commit protocols are written against.

`staged_upload` stands a local path in a private folder for an output URL; `target_for` gives
a protocol the target for an output path (the bucket prefix when the path is staged for a
URL, the local directory otherwise). This module knows no format and decides nothing about
what an output is made of.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from wavg.storage.local_target import LocalTarget

# Staging folder -> the output URL its files stand for (one entry per run in flight).
_STAGED: dict[Path, str] = {}


class Target(Protocol):
    """The output's place: its name, and the files (objects) beside it by name."""

    name: str
    display: str  # how errors name the output

    def check_file(self) -> None:
        """Fail early if the output cannot be a file (object) created there."""

    def entries(self) -> dict[str, int | None]:
        """Name -> size of the files beside the output (None: not a regular file)."""

    def read(self, name: str, limit: int) -> bytes | None:
        """A small file's bytes; empty if missing, None if unreadable or over `limit`."""

    def create(self, name: str) -> Path:
        """A new empty local file for the caller to write and fsync (`FileExistsError` if
        one exists); it reaches the target when published."""

    def publish(self, name: str) -> None:
        """Make the file written at `create(name)`'s path visible at the target."""

    def put(self, name: str, data: bytes, new: bool = False) -> bool:
        """Write `name` whole or not at all; with `new` only if there is none (else False)."""

    def put_file(self, name: str, source: str) -> None:
        """Put the file written (and fsynced) at `create(source)`'s path at `name`, whole,
        replacing any file of that name; `source` is gone afterwards."""

    def delete(self, name: str) -> None:
        """Remove `name`, best effort (never raises)."""

    def sync(self) -> None:
        """Make what was created or published so far durable before the next step."""

    def remove_dead_temps(self, keep: Callable[[str], object]) -> None:
        """Remove temporary files killed runs left for this output, but those `keep` names."""

    def folder_names(self) -> list[str] | None:
        """The files of the output as a folder; None if there is none."""

    def new_folder(
        self, check: Callable[[list[str] | None], None], last: Sequence[str], kind: str
    ) -> contextlib.AbstractContextManager[Path]:
        """An empty local folder that replaces the output folder on normal exit (in a
        bucket, the files named in `last` are uploaded last, in that order)."""


def target_for(out: Path) -> Target:
    """The target a protocol commits the output `out` to."""
    url = _STAGED.get(out.parent)
    if url is None:
        return LocalTarget(out)
    from wavg.storage.bucket_target import BucketTarget

    return BucketTarget(url, out.parent)


@contextlib.contextmanager
def staged_upload(url: str) -> Iterator[Path]:
    """A local path in a private temporary folder standing for the output `url`.

    A format that commits several files writes them through `target_for`, straight to the
    bucket, with its commit point last. A format that writes one file writes it at the
    path, as anywhere; when the block exits normally that file (if there is one: a dry run
    writes none) is uploaded whole. If the block raises, nothing more is uploaded.
    """
    from wavg.storage.remote import abort_stale_uploads, check_output_bucket, upload

    check_output_bucket(url)
    abort_stale_uploads(url)
    directory = Path(tempfile.mkdtemp(prefix="wavg-upload-"))
    _STAGED[directory] = url
    try:
        local = directory / url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        yield local
        if os.path.lexists(local):
            upload([(local, url)])
    finally:
        del _STAGED[directory]
        shutil.rmtree(directory, ignore_errors=True)
