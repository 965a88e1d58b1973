"""Open the HDF5 weights inside any checkpoint format and list its tensors.

Shared by the in-memory baseline and the output check. A ``.keras`` file is a zip whose
``model.weights.h5`` member Keras stores uncompressed, so h5py can read it in place through
the zip member's seekable file object; ``.h5`` and ``.weights.h5`` are HDF5 files already.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

KERAS_WEIGHTS_MEMBER = "model.weights.h5"


@contextmanager
def open_weights(path: Path | str) -> Iterator[h5py.File]:
    """The HDF5 file holding a checkpoint's weights, opened read-only."""
    path = Path(path)
    if path.suffix == ".keras":
        with (
            zipfile.ZipFile(path) as archive,
            archive.open(KERAS_WEIGHTS_MEMBER) as member,
            h5py.File(member, "r") as handle,
        ):
            yield handle
    else:
        with h5py.File(path, "r") as handle:
            yield handle


def tensor_names(handle: h5py.File) -> list[str]:
    """Paths of every dataset in the file, in HDF5's (alphabetical) visiting order.

    Legacy ``.h5`` files also hold the model config as attributes and, once compiled and
    trained, optimizer state under ``optimizer_weights``; all datasets count as tensors here,
    as they do for an averaging tool that copies the layout of its inputs.
    """
    names: list[str] = []

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            names.append(name)

    handle.visititems(visit)
    return names
