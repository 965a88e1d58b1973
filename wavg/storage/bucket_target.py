"""An output's place in object storage, as a commit protocol's target: the objects beside it.

One object appears whole or not at all, but no request covers several: the protocol above
puts its commit point last. Files are written in a private local staging folder first and
uploaded when published; every request is retried like any other (`storage.remote`). This
module knows no format: which object is the commit point, and what may go, is the protocol's.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from wavg._runtime import signals_held
from wavg.errors import CleanupWarning, OutputError
from wavg.storage.atomic import CREATE_NEW
from wavg.storage.locations import redact
from wavg.storage.remote import _retrying, abort_stale_uploads, filesystem, upload


class BucketTarget:
    """The output object at `url` and the objects directly beside it; files are staged in
    `staging` (a private local folder) before they are uploaded."""

    def __init__(self, url: str, staging: Path) -> None:
        self.url = url.split("?", 1)[0].rstrip("/")
        self.display = redact(url)
        self.fs, key = filesystem(url)
        self.key = key.rstrip("/")
        self.folder_key, _, self.name = self.key.rpartition("/")
        self.folder_url = self.url.rpartition("/")[0]
        self.staging = staging

    def _call(self, what: Callable[[], Any]) -> Any:
        return _retrying(what, self.display, OutputError)

    # -- objects beside the output ---------------------------------------------------------

    def check_file(self) -> None:
        """Nothing to check beyond the bucket (see `staged_upload`): any key can be an object."""

    def entries(self) -> dict[str, int | None]:
        """Name -> size of the objects directly beside the output."""

        def attempt() -> list[dict]:
            self.fs.invalidate_cache(self.folder_key)
            try:
                return self.fs.ls(self.folder_key, detail=True)
            except FileNotFoundError:
                return []

        return {
            info["name"].rstrip("/").rpartition("/")[2]: int(info.get("size") or 0)
            for info in self._call(attempt)
            if info.get("type") != "directory"
        }

    def read(self, name: str, limit: int) -> bytes | None:
        """A small object's bytes (an index, a marker), or None if unreadable or over `limit`."""
        try:
            data = self._call(lambda: self.fs.cat_file(f"{self.folder_key}/{name}"))
        except OutputError:
            return None
        return data if len(data) <= limit else None

    def create(self, name: str) -> Path:
        """An empty local file for the caller to write; `publish` uploads it."""
        path = self.staging / name
        os.close(os.open(path, CREATE_NEW, 0o644))
        return path

    def publish(self, name: str) -> None:
        """Upload the file written at `create(name)`'s path."""
        upload([(self.staging / name, f"{self.folder_url}/{name}")])

    def put(self, name: str, data: bytes, new: bool = False) -> bool:
        """Put the object `name` whole; with `new`, only if the listing shows none (False
        then: a race with another writer is the protocol's names' to avoid)."""
        if new and name in self.entries():
            return False
        key = f"{self.folder_key}/{name}"
        self._call(lambda: self.fs.pipe_file(key, data))
        return True

    def put_file(self, name: str, source: str) -> None:
        """Upload the staged file `source` as the object `name` (an upload lands whole)."""
        upload([(self.staging / source, f"{self.folder_url}/{name}")])
        with contextlib.suppress(OSError):
            os.unlink(self.staging / source)

    def delete(self, name: str) -> None:
        """Best effort: what is left is found again by the next run."""
        self._delete([f"{self.folder_key}/{name}"])

    def remove_from_folder(self, names: list[str]) -> None:
        """Remove the objects `names` (relative to the output folder), best effort."""
        self._delete([f"{self.key}/{name}" for name in names])

    def _delete(self, keys: list[str]) -> list[str]:
        """Remove `keys`, best effort; the keys left behind."""
        left = []
        for key in keys:
            try:
                self._call(lambda key=key: self.fs.rm_file(key))
            except Exception:
                left.append(key)
        return left

    def sync(self) -> None:
        """Nothing to do: an object is durable once its upload returns."""

    def remove_dead_temps(self, keep: Callable[[str], object]) -> None:
        """Nothing to do: temporary files live in the staging folder, never in the bucket."""

    # -- the output as a folder ------------------------------------------------------------

    def folder_names(self) -> list[str] | None:
        """Every object under the output folder, relative to it; None if there is none."""

        def attempt() -> list[str]:
            self.fs.invalidate_cache(self.key)
            try:
                return self.fs.find(self.key)
            except FileNotFoundError:
                return []

        prefix = self.key + "/"
        return [p[len(prefix) :] for p in self._call(attempt) if p.startswith(prefix)] or None

    @contextlib.contextmanager
    def new_folder(
        self, check: Callable[[list[str] | None], None], last: Sequence[str], kind: str
    ) -> Iterator[Path]:
        """Yield an empty local folder; on normal exit its files are uploaded under the
        output's prefix, those named in `last` last and in that order (what a reader looks
        for first), then the objects under the prefix that the new folder lacks are deleted.
        `check` judges the prefix at the start and again just before the upload (it may
        have changed since)."""
        check(self.folder_names())
        abort_stale_uploads(self.url, folder=True)
        local = Path(tempfile.mkdtemp(dir=self.staging))
        yield local
        before = self.folder_names() or []
        check(before)
        rank = {name: i for i, name in enumerate(last)}
        files = sorted(
            (p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()),
            key=lambda r: (rank.get(r, -1), r),
        )
        for r in files:
            # One object at a time, whole: a signal raised while a request is in flight would
            # leave it to finish in fsspec's thread, after the caller's cleanup.
            with signals_held():
                upload([(local / r, f"{self.url}/{r}")])
        # Committed: what the new folder lacks is removed as cleanup, and a failure is only
        # reported (the next run's `before` finds it again).
        left = self._delete([f"{self.key}/{r}" for r in sorted(set(before) - set(files))])
        if left:
            warnings.warn(
                CleanupWarning(
                    f"{self.display}: written, but {len(left)} object(s) of the previous "
                    "output were not removed (storage unreachable); the next run for this "
                    "output removes them"
                ),
                stacklevel=3,
            )
