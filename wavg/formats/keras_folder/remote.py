"""An unzipped ``.keras`` folder in object storage: a prefix holding config.json and
model.weights.h5 (``s3://bucket/run/ep49/``), read as a `keras_folder.Tree`.

The prefix is listed once (by storage: `RemotePrefix`); each file is then a `RemoteFile`
(pinned by ETag/generation, read by ranges), so the weights are averaged without downloading
them and the other files are copied from the newest folder. Object names are untrusted: a key is a free string, so one
whose relative name has an empty, ``.`` or ``..`` segment, a backslash or a NUL would name a
path outside the output folder once copied, and is refused.
"""

from __future__ import annotations

from wavg.errors import CheckpointError, UnsafeCheckpoint
from wavg.formats.keras_folder import check_copied_size, check_file_count
from wavg.storage.bytesource import ByteSource
from wavg.storage.locations import is_plain_relative_path
from wavg.storage.remote import RemoteFile, RemotePrefix


class RemoteTree:
    """The objects under a prefix, by name relative to it (storage listed them once)."""

    def __init__(self, prefix: RemotePrefix) -> None:
        self.url, self.path, self.files = prefix.url, prefix.path, prefix.files
        self.prefix = prefix
        check_file_count(len(self.files), self.path)

    def names(self) -> set[str]:
        return self.prefix.names()

    def walk(self, names: set[str]) -> tuple[list[str], list[str]]:
        files = [r for r in self.files if r.split("/", 1)[0] in names]
        folders: set[str] = set()
        for relative in files:
            _check_name(relative, self.path)
            parts = relative.split("/")[:-1]
            folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return sorted(folders, key=lambda f: (f.count("/"), f)), files

    def open(self, relative: str) -> ByteSource:
        _check_name(relative, self.path)
        try:
            file = RemoteFile(f"{self.url}/{relative}")
        except CheckpointError as exc:
            raise type(exc)(self.path, f"{relative}: {exc.problem}") from None
        check_copied_size(file, relative, self.path)
        return file


def _check_name(relative: str, path: str) -> None:
    if not is_plain_relative_path(relative):
        raise UnsafeCheckpoint(path, f"holds an object named {relative!r}, not a plain path")
