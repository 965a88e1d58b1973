"""An unzipped ``.keras`` folder in object storage: a prefix holding config.json and
model.weights.h5 (``s3://bucket/run/ep49/``), read as a `keras_dir.Tree`.

The prefix is listed once; each file is then a `RemoteFile` (pinned by ETag/generation, read
by ranges), so the weights are averaged without downloading them and the other files are
copied from the newest folder. Object names are untrusted: a key is a free string, so one
whose relative name has an empty, ``.`` or ``..`` segment, a backslash or a NUL would name a
path outside the output folder once copied, and is refused.
"""

from __future__ import annotations

from wavg.errors import CheckpointError, UnsafeCheckpoint
from wavg.formats.keras_folder import WEIGHTS, check_copied_size, check_file_count
from wavg.formats.keras_folder.commit import CONFIG
from wavg.storage.bytesource import ByteSource
from wavg.storage.locations import is_plain_relative_path, redact
from wavg.storage.remote import RemoteFile, _retrying, filesystem


class RemoteTree:
    """The objects under a prefix, by name relative to it."""

    def __init__(self, url: str) -> None:
        self.url = url.split("?", 1)[0].rstrip("/")
        self.path = redact(url)
        fs, key = filesystem(url)
        prefix = key.rstrip("/") + "/"

        def attempt() -> dict:
            fs.invalidate_cache(key)
            try:
                return fs.find(prefix, detail=True)
            except FileNotFoundError:
                return {}

        self.files: list[str] = []
        for name, info in sorted(_retrying(attempt, self.path).items()):
            if not name.startswith(prefix) or info.get("type") == "directory":
                continue
            relative = name[len(prefix) :]
            if relative and not relative.endswith("/"):  # not a console's "folder" marker
                self.files.append(relative)
            check_file_count(len(self.files), self.path)

    def is_model_folder(self) -> bool:
        """Whether Keras' loader would take the folder for a model (as `is_keras_folder`)."""
        return bool({CONFIG, WEIGHTS} & self.names())

    def names(self) -> set[str]:
        return {relative.split("/", 1)[0] for relative in self.files}

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
