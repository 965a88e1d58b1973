"""Checkpoint formats: open any supported file as a `Checkpoint` and write its like.

The format is recognised from the file's bytes, not its name: a zip archive is a ``.keras``
model, an HDF5 file is a legacy ``.h5`` model, legacy weights or Keras 3 ``.weights.h5``
(told apart by their layout, see `layouts`). Checkpoints of several files are recognised by
content too: a JSON index is sharded weights, a folder (or a prefix in a bucket) holding
config.json or model.weights.h5 an unzipped ``.keras`` model, a local folder an Orbax step
(see `orbax_steps`); an Orbax root stands for its committed steps
(`expand_checkpoint_dirs`). Where the bytes come from (a local file, an object in storage)
is the byte source's business (`open_source`); formats never ask.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from wavg.errors import CheckpointError
from wavg.formats.base import Checkpoint, Tensor, Writer, iter_blocks
from wavg.formats.orbax import steps as orbax_steps
from wavg.storage.bytesource import ByteSource
from wavg.storage.local import InputFile
from wavg.storage.locations import Location, Url, as_location

__all__ = [
    "Checkpoint",
    "Tensor",
    "Writer",
    "expand_checkpoint_dirs",
    "iter_blocks",
    "open_checkpoint",
    "local_copies",
    "open_source",
    "staged_output",
]


def expand_checkpoint_dirs(locations: list[Location]) -> tuple[list[Location], list[str]]:
    """The checkpoints that `locations` name, and warnings about entries skipped.

    A directory of checkpoints (an OrbaxCheckpoint root) stands for its committed steps,
    oldest first, locally or in a bucket (an s3:// or gs:// URL is listed once through
    TensorStore when it is installed: a root or step becomes `StepUrl`s, anything else is
    an object); every other location stands for itself. Reads listings only.
    """
    found: list[Location] = []
    warnings: list[str] = []
    for location in locations:
        if isinstance(location, Url):
            expanded = None
            if not isinstance(location, orbax_steps.StepUrl):
                from wavg.formats.orbax import remote as orbax_remote

                if orbax_remote.handles(location.url):
                    expanded = orbax_remote.expand_url(location.url)
            if expanded is None:
                found.append(location)
            else:
                found.extend(expanded[0])
                warnings.extend(expanded[1])
            continue
        steps, skipped = orbax_steps.expand_inputs([os.fspath(location)])
        found.extend(Path(step) for step in steps)
        warnings.extend(skipped)
    return found, warnings


def open_source(name: str | os.PathLike[str] | Url) -> ByteSource:
    """The byte source for a checkpoint name: a local `InputFile`, or a `RemoteFile` for a
    URL. Identity is pinned here, at first open."""
    location = as_location(name)
    if isinstance(location, Url):
        from wavg.storage.remote import RemoteFile

        return RemoteFile(location.url)
    return InputFile(os.fspath(location))


def local_copies(locations: list[Location], directory: Path) -> list[Path]:
    """Local paths for `locations`: local ones as they are, URLs downloaded whole into their
    own folders under `directory` (for tools that need a file, like Keras' loaders)."""
    found: list[Path] = []
    for i, location in enumerate(locations):
        if isinstance(location, Url):
            from wavg.storage.remote import download

            folder = directory / str(i)
            folder.mkdir(parents=True)
            found.append(download(location.url, folder))
        else:
            found.append(location)
    return found


@contextlib.contextmanager
def staged_output(out: Location) -> Iterator[Path]:
    """The local path a format commits `out` to: `out` itself when local; for a URL, a path
    in a private temporary directory standing for it: a multi-file format's commit protocol
    writes through it to the bucket, a single file there is uploaded when the block exits
    normally (see `storage.target.staged_upload`)."""
    if not isinstance(out, Url):
        yield out
        return
    from wavg.storage.target import staged_upload

    with staged_upload(out.url) as local:
        yield local


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURE = b"PK\x03\x04"


def open_checkpoint(
    path: str | os.PathLike[str] | Url, like: Checkpoint | None = None
) -> Checkpoint:
    """Open `path` read-only and list its tensors; raises `CheckpointError` if it is unusable.

    `like`, an open checkpoint likely of the same run (another input), lets a format verify
    that this file has its structure instead of walking it afresh.
    """
    # Orbax: a local step directory, recognised by its content, or a step in a bucket found
    # by listing it (roots are expanded earlier, see `expand_checkpoint_dirs`).
    if isinstance(path, orbax_steps.StepUrl) or (
        not isinstance(path, Url) and orbax_steps.is_step(path)
    ):
        from wavg.formats.orbax.step import OrbaxStep

        return OrbaxStep(path if isinstance(path, Url) else os.fspath(path))
    folder = _open_folder(path)
    if folder is not None:
        return folder
    try:
        file = open_source(path)
    except CheckpointError as exc:
        folder = _open_remote_folder(path, exc)
        if folder is None:
            raise
        return folder
    try:
        if _is_index(file):
            from wavg.formats.sharded.reader import ShardedCheckpoint

            return ShardedCheckpoint(file)
        kind = _sniff(file)
        if kind == "zip":
            from wavg.formats.keras_zip import KerasCheckpoint

            return KerasCheckpoint(file, like)
        from wavg.formats.h5file import H5Checkpoint

        return H5Checkpoint(file, like=like)
    except BaseException:
        file.release()
        raise


# -- checkpoints of several files: an unzipped .keras folder, a sharded weights index --------


def _open_folder(path: str | os.PathLike[str] | Url) -> Checkpoint | None:
    """A local unzipped .keras folder, or None for anything else (the byte source then names
    a bare folder)."""
    location = as_location(path)
    if isinstance(location, Url) or not os.path.isdir(location):
        return None
    from wavg.formats.keras_folder import KerasFolderCheckpoint, is_keras_folder

    folder = os.fspath(location)
    return KerasFolderCheckpoint(folder) if is_keras_folder(folder) else None


def _open_remote_folder(
    path: str | os.PathLike[str] | Url, problem: CheckpointError
) -> Checkpoint | None:
    """An unzipped .keras folder at a URL that names a prefix (`problem` said so), or None."""
    from wavg.storage.remote import IsAPrefix

    if not isinstance(problem, IsAPrefix):
        return None
    from wavg.formats.keras_folder import KerasFolderCheckpoint
    from wavg.formats.keras_folder.remote import RemoteTree

    location = as_location(path)
    assert isinstance(location, Url)  # only a URL's byte source says IsAPrefix
    tree = RemoteTree(location.url)
    return KerasFolderCheckpoint(tree.path, tree) if tree.is_model_folder() else None


def _is_index(file: ByteSource) -> bool:
    from wavg.formats.sharded.index import looks_like_index

    return looks_like_index(file.read_at(0, min(64, file.size)))


# ---------------------------------------------------------------------------------------------


def _sniff(file: ByteSource) -> str:
    head = file.read_at(0, min(8, file.size)) if file.size >= 8 else b""
    if head.startswith(_ZIP_SIGNATURE):
        return "zip"
    # HDF5 looks for its signature at 0, 512, 1024, 2048, ... (after a user block).
    offset = 0
    while offset + 8 <= file.size:
        if file.read_at(offset, 8) == _HDF5_SIGNATURE:
            return "hdf5"
        offset = 512 if offset == 0 else offset * 2
    if file.size < 8:
        raise CheckpointError(file.path, "too short to be a checkpoint (truncated?)")
    raise CheckpointError(file.path, "not a Keras checkpoint (neither HDF5 nor a .keras archive)")
