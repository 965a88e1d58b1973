"""Stand-alone HDF5 checkpoints: legacy ``.h5`` models and weights, Keras 3 ``.weights.h5``.

The output is the newest input's bytes (or, with objects dropped, its HDF5 structure rebuilt)
at the temporary path, whose averaged tensors are then filled in place with ``pwrite``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np

from wavg.errors import CheckpointError
from wavg.formats.base import Checkpoint, Tensor, Writer
from wavg.formats.hdf5.reader import Hdf5Checkpoint, open_hdf5
from wavg.formats.hdf5.skeleton import as_bytes, copy_around_tensors, lay_out_output, pwrite_all
from wavg.formats.layouts import PLAIN_HDF5, Layout, hdf5_layout
from wavg.storage.bytesource import ByteSource


class H5Checkpoint(Hdf5Checkpoint):
    """A checkpoint that is itself an HDF5 file."""

    def __init__(
        self, file: ByteSource, layout: Layout | None = None, like: Checkpoint | None = None
    ) -> None:
        """`layout` is recognised from the file unless given (a shard of a sharded checkpoint
        may hold only optimizer state, which alone does not tell its layout). `like`: an
        input of the same run whose checked structure this one may share (see
        `Hdf5Checkpoint._predict_from`)."""
        super().__init__(file, layout or PLAIN_HDF5)
        if self._predict_from(like, base_offset=0, data_end=file.size):
            return  # `like`'s structure, verified byte for byte (no HDF5 open)
        h5 = open_hdf5(file)
        try:
            self.layout = layout or hdf5_layout(h5)
        except (OSError, RuntimeError, ValueError) as exc:
            h5.close()
            raise CheckpointError(file.path, f"damaged HDF5 file ({exc})") from None
        self._h5 = h5
        # Offsets from h5py are absolute in the file, user block included.
        self._load_tensors(base_offset=0, data_end=file.size)

    def _open_weights(self) -> h5py.File:
        h5 = open_hdf5(self.file)
        self.file.check_unchanged()
        return h5

    def model_config(self) -> dict | None:
        config = self._json_attribute("model_config")
        return config if isinstance(config, dict) else None

    def training_config(self) -> Any:
        return self._json_attribute("training_config")

    def _json_attribute(self, name: str) -> Any:
        # Read only after `_load_tensors` has checked the global heaps that hold the string.
        try:
            with self.weights_h5() as h5:
                text = h5.attrs.get(name)
            return json.loads(text) if text is not None else None
        except (OSError, RuntimeError, ValueError, TypeError):  # RecursionError: RuntimeError
            return None

    def weights_bytes(self) -> tuple[int, int] | None:
        return (0, self.file.size) if self.raw_readable else None

    def make_writer(self, tmp_path: str, keep: Callable[[str], bool] | None) -> Writer:
        return H5Writer(self, tmp_path, keep)


class H5Writer(Writer):
    """Writes averaged blocks with pwrite into a copy of the newest file's other bytes.

    Usually the output is the newest input byte for byte outside the averaged tensors, so
    those bytes are copied (``copy_file_range``) and the tensors' ranges left as holes to
    fill; when objects are dropped or a tensor is not raw, the HDF5 skeleton is rebuilt.
    """

    def __init__(
        self, template: Hdf5Checkpoint, tmp_path: str, keep: Callable[[str], bool] | None
    ) -> None:
        self.path = tmp_path
        self.offsets, copied = lay_out_output(template, tmp_path, keep)
        self.order = sorted(self.offsets, key=self.offsets.__getitem__)
        self._fd: int | None = os.open(tmp_path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        if copied:
            copy_around_tensors(template, self.offsets, self._fd)

    def write(self, tensor: Tensor, start: int, data: np.ndarray) -> None:
        assert self._fd is not None
        offset = self.offsets[tensor.name] + start * tensor.storage.itemsize
        pwrite_all(self._fd, as_bytes(data), offset)

    def finish(self) -> int:
        assert self._fd is not None
        os.fsync(self._fd)
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
