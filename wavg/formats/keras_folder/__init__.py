"""Unzipped ``.keras`` folders: ``model.save(dir, zipped=False)``'s config.json, metadata.json
and model.weights.h5 (and an ``assets/`` tree when the model has assets).

The weights file is averaged as an HDF5 checkpoint; every other file is copied from the
newest folder byte for byte, as data, and the new folder replaces the old one
(`keras_folder.commit`: one swap locally, config.json last in a bucket). The folder may be
local or a prefix in object storage (`keras_folder.remote.RemoteTree`): either way it is a
`Tree` of relative names and byte sources. Nothing here follows a link out of the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from wavg.errors import CheckpointError, UnsafeCheckpoint, UsageError
from wavg.formats.base import Writer
from wavg.formats.composite import CompositeCheckpoint, PartsWriter
from wavg.formats.keras_folder.commit import check_model_folder, folder_output
from wavg.formats.layouts import CONFIG, KERAS3_WEIGHTS, KERAS_FOLDER, WEIGHTS
from wavg.storage.atomic import CREATE_NEW
from wavg.storage.bytesource import ByteSource
from wavg.storage.local import InputFile

# Files other than the weights are copied whole; as in archives, none may be huge.
MAX_COPIED_BYTES = 256 << 20
MAX_COPIED_FILES = 10_000
COPY_BLOCK = 1 << 20


def is_keras_folder(path: str) -> bool:
    """A local folder Keras' loader would take for a model: it holds config.json or the
    weights."""
    return os.path.isdir(path) and any(
        os.path.lexists(os.path.join(path, name)) for name in (CONFIG, WEIGHTS)
    )


def holds_model_files(names: set[str]) -> bool:
    """Whether a folder's names (a prefix's, in a bucket) make it a model for Keras' loader,
    as `is_keras_folder` for a local one."""
    return bool({CONFIG, WEIGHTS} & names)


class Tree(Protocol):
    """A model folder's files by relative name (``assets/vocab.txt``), wherever they are."""

    def names(self) -> set[str]:
        """The names directly in the folder."""

    def walk(self, names: set[str]) -> tuple[list[str], list[str]]:
        """The sub-folders and files under `names`, relative to the folder."""

    def open(self, relative: str) -> ByteSource:
        """A byte source for a file of the folder, pinned like any input."""


class KerasFolderCheckpoint(CompositeCheckpoint):
    """A model folder; its model.weights.h5 is averaged, everything else is copied."""

    def __init__(self, path: str, tree: Tree | None = None) -> None:
        tree = tree if tree is not None else LocalTree(path)
        names = tree.names()
        for needed in (CONFIG, WEIGHTS):
            if needed not in names:
                other = sorted(n for n in names if n.startswith("model.weights"))
                hint = f" (found {other[0]}, which wavg does not average)" if other else ""
                raise CheckpointError(path, f"not a Keras model folder: no {needed}{hint}")
        self.copies: list[tuple[str, ByteSource]] = []
        try:
            self.folders, files = tree.walk(names - {WEIGHTS})
            for relative in files:
                file = tree.open(relative)
                file.release()  # reopened (and re-identified) when copied
                self.copies.append((relative, file))
            super().__init__(path, KERAS_FOLDER, [f for _, f in self.copies])
            weights = tree.open(WEIGHTS)
            try:
                part = self._open_part(weights, KERAS3_WEIGHTS)
            except BaseException:
                weights.release()
                raise
            self._set_parts([(WEIGHTS, part)])
        except BaseException:
            for _, file in self.copies:
                file.release()
            raise

    def model_config(self) -> dict | None:
        config = next((f for relative, f in self.copies if relative == CONFIG), None)
        try:
            parsed = json.loads(config.read_at(0, config.size)) if config is not None else None
        except (CheckpointError, ValueError, RecursionError):
            return None
        return parsed if isinstance(parsed, dict) else None

    def check_output(self, out: Path) -> None:
        if out.name.lower().endswith(".keras"):
            raise UsageError(
                f"output {out} would be a folder, but Keras reads a name ending in .keras as an "
                "archive; pick a name without it"
            )
        check_model_folder(out)

    @contextlib.contextmanager
    def output(self, out: Path, keep: Callable[[str], bool] | None) -> Iterator[Writer]:
        """A new folder: the copied files, then the averaged weights; swapped in on exit."""
        with folder_output(out) as tmp:
            weights_path = tmp / WEIGHTS
            os.close(os.open(weights_path, CREATE_NEW, 0o644))
            _, part = self.parts[0]
            writer = part.make_writer(str(weights_path), keep)
            try:
                yield PartsWriter([writer], lambda: self._copy_into(tmp))
            finally:
                writer.close()

    def _copy_into(self, tmp: Path) -> int:
        for relative in self.folders:
            os.mkdir(tmp / relative, 0o755)
        return sum(_copy_file(file, tmp / relative) for relative, file in self.copies)


class LocalTree:
    """A model folder on a local disk: only regular files, and symlinks kept inside it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = Path(path)

    def names(self) -> set[str]:
        try:
            return set(os.listdir(self.folder))
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot list the folder ({exc.strerror})") from None

    def walk(self, names: set[str]) -> tuple[list[str], list[str]]:
        found: list[str] = []
        folders: list[str] = []
        pending = sorted(names)
        while pending:
            relative = pending.pop(0)
            mode = os.lstat(self.folder / relative).st_mode
            if stat.S_ISDIR(mode):
                folders.append(relative)
                children = sorted(os.listdir(self.folder / relative))
                pending.extend(f"{relative}/{child}" for child in children)
            elif stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                found.append(relative)
            else:
                raise UnsafeCheckpoint(self.path, f"{relative} is not a regular file")
            check_file_count(len(found) + len(pending), self.path)
        return folders, found

    def open(self, relative: str) -> ByteSource:
        """Open a file of the folder; a symlink must stay in the folder."""
        target = self.folder / relative
        if target.is_symlink():
            real = Path(os.path.realpath(target))
            root = Path(os.path.realpath(self.folder))
            if root not in real.parents:
                raise UnsafeCheckpoint(
                    self.path, f"{relative} is a symlink leading out of the folder"
                )
        try:
            file = InputFile(str(target))
        except CheckpointError as exc:
            raise type(exc)(self.path, f"{relative}: {exc.problem}") from None
        check_copied_size(file, relative, self.path)
        return file


def check_file_count(count: int, path: str) -> None:
    if count > MAX_COPIED_FILES:
        raise UnsafeCheckpoint(path, f"holds over {MAX_COPIED_FILES} files")


def check_copied_size(file: ByteSource, relative: str, path: str) -> None:
    """A copied file (any but the weights) must be small, as in archives."""
    if relative != WEIGHTS and file.size > MAX_COPIED_BYTES:
        file.release()
        raise UnsafeCheckpoint(path, f"{relative} is implausibly large for a model file")


def _copy_file(file: ByteSource, target: Path) -> int:
    """Copy an input file (re-identified on open) to a new file, fsynced."""
    fd = os.open(target, CREATE_NEW, 0o644)
    try:
        at = 0
        while at < file.size:
            chunk = file.read_at(at, min(COPY_BLOCK, file.size - at))
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            at += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return at
