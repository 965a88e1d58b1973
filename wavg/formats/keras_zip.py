"""``.keras`` archives: a zip of config.json, metadata.json and model.weights.h5.

Keras stores the weights member uncompressed, so it is read in place: h5py sees a window of
the archive, and raw tensors are read at (member start + dataset offset) with no copy.
The output archive copies every other member of the newest input verbatim and streams the
averaged weights member in one sequential pass (the skeleton's bytes, with each averaged
tensor's bytes in its place), so no unzipped copy is ever written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import IO

import h5py
import numpy as np

from wavg.errors import CheckpointError, UnsafeCheckpoint
from wavg.formats.base import Checkpoint, Tensor, Writer
from wavg.formats.hdf5.reader import Hdf5Checkpoint
from wavg.formats.hdf5.skeleton import as_bytes, lay_out_output
from wavg.formats.hdf5.walk import open_h5
from wavg.formats.layouts import CONFIG, KERAS_ARCHIVE, WEIGHTS
from wavg.storage.bytesource import ByteSource
from wavg.storage.local import Window as _Window

# Members other than the weights are read whole; a zip bomb must not get that far.
MAX_SMALL_MEMBER = 256 << 20
MAX_RATIO = 200
_LOCAL_HEADER = struct.Struct("<4s22xHH")
COPY_BLOCK = 1 << 20
# NotImplementedError: an unknown zip version or compression method.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError)


class _Checked(io.RawIOBase):
    """A member stream whose decompression errors are `CheckpointError`s naming the archive.

    h5py passes exceptions raised by a file object through unchanged, so a damaged deflate
    stream surfaces as one line naming the file instead of a zlib traceback.
    """

    def __init__(self, stream: IO[bytes], path: str) -> None:
        self._stream, self._path = stream, path

    def _call(self, method: str, *args):
        try:
            return getattr(self._stream, method)(*args)
        except _ZIP_ERRORS as exc:
            raise CheckpointError(self._path, f"damaged archive member {WEIGHTS} ({exc})") from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._call("seek", offset, whence)

    def tell(self) -> int:
        return self._call("tell")

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self._call("read", len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)


class KerasCheckpoint(Hdf5Checkpoint):
    """A ``.keras`` archive whose model.weights.h5 is averaged."""

    def __init__(self, file: ByteSource, like: Checkpoint | None = None) -> None:
        super().__init__(file, KERAS_ARCHIVE)
        self.members = _check_members(file)
        info = self.members[WEIGHTS]
        self._weights_info = info
        if info.compress_type == zipfile.ZIP_STORED:
            self._data_start = start = _data_start(file, info)
            # `like`'s structure when verified byte for byte (see Hdf5Checkpoint._predict_from).
            if not self._predict_from(like, start, start + info.file_size):
                self._load_tensors(base_offset=start, data_end=start + info.file_size)
        else:
            # A re-zipped archive: readable, but only through the zip stream (no raw reads).
            self._data_start = None
            self._load_tensors(base_offset=0, data_end=info.file_size, in_file=False)
            self.tensors = {n: _without_offset(t) for n, t in self.tensors.items()}

    def _weights_reader(self) -> Callable[[int, int], bytes]:
        if self._data_start is not None:
            return self.file.read_at
        stream = self._compressed_weights()

        def read_at(offset: int, size: int) -> bytes:
            stream.seek(offset)
            return stream.read(size)

        return read_at

    def _compressed_weights(self) -> IO[bytes]:
        """The compressed weights member as a decompressing stream (a rare, slow path)."""
        try:
            archive = zipfile.ZipFile(_Window(self.file, 0, self.file.size))
            return _Checked(archive.open(WEIGHTS), self.path)
        except _ZIP_ERRORS as exc:
            raise CheckpointError(self.path, f"damaged archive member {WEIGHTS} ({exc})") from None

    def _hdf5_base(self) -> int | None:
        return self._data_start  # None: a compressed member, read through a decompressor

    def _open_weights(self) -> h5py.File:
        info = self._weights_info
        if self._data_start is not None:
            source = io.BufferedReader(
                _Window(self.file, self._data_start, info.file_size), 1 << 16
            )
        else:
            source = self._compressed_weights()
        return open_h5(source, f"{self.path}:{WEIGHTS}")

    def read_member(self, name: str) -> bytes:
        with zipfile.ZipFile(_Window(self.file, 0, self.file.size)) as archive:
            try:
                return archive.read(name)
            except _ZIP_ERRORS as exc:
                raise CheckpointError(self.path, f"damaged archive member {name} ({exc})") from None

    def model_config(self) -> dict | None:
        if CONFIG not in self.members:
            return None
        try:
            config = json.loads(self.read_member(CONFIG))
        except (CheckpointError, ValueError, RecursionError):
            return None
        return config if isinstance(config, dict) else None

    def weights_bytes(self) -> tuple[int, int] | None:
        if self._data_start is None or not self.raw_readable:
            return None
        return self._data_start, self._weights_info.file_size

    def make_writer(self, tmp_path: str, keep: Callable[[str], bool] | None) -> Writer:
        return KerasWriter(self, tmp_path, keep)


def _without_offset(t: Tensor) -> Tensor:
    return Tensor(t.name, t.shape, t.dtype, t.storage, t.averaged, None)


def _check_members(file: ByteSource) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by name, after refusing anything a safe reader must not touch."""
    try:
        with zipfile.ZipFile(_Window(file, 0, file.size)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(file.path, f"not a valid .keras archive ({exc})") from None
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise UnsafeCheckpoint(file.path, f"archive entry {name!r} points outside the archive")
        if name in members:
            raise UnsafeCheckpoint(file.path, f"archive entry {name!r} appears twice")
        if info.flag_bits & 0x1:
            raise CheckpointError(file.path, f"archive entry {name!r} is encrypted")
        if info.header_offset + info.compress_size > file.size:
            raise CheckpointError(file.path, f"truncated: archive entry {name!r} runs past the end")
        stored = info.compress_type == zipfile.ZIP_STORED
        if (stored and info.file_size != info.compress_size) or (
            not stored and info.file_size > MAX_RATIO * max(info.compress_size, 1 << 10)
        ):
            raise UnsafeCheckpoint(
                file.path,
                f"archive entry {name!r} declares {info.file_size} bytes from "
                f"{info.compress_size} stored; refusing a zip bomb",
            )
        if name != WEIGHTS and info.file_size > MAX_SMALL_MEMBER:
            raise UnsafeCheckpoint(file.path, f"archive entry {name!r} is implausibly large")
        members[name] = info
    if WEIGHTS not in members:
        other = [n for n in members if n.startswith("model.weights")]
        detail = f" (found {other[0]}, which wavg does not average)" if other else ""
        raise CheckpointError(file.path, f"not a Keras model archive: no {WEIGHTS}{detail}")
    return members


def _data_start(file: ByteSource, info: zipfile.ZipInfo) -> int:
    header = file.read_at(info.header_offset, _LOCAL_HEADER.size)
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if signature != b"PK\x03\x04":
        raise CheckpointError(file.path, f"damaged archive: bad header for {info.filename}")
    name = file.read_at(info.header_offset + _LOCAL_HEADER.size, name_len)
    if name.decode("utf-8", "replace") != info.filename:
        raise UnsafeCheckpoint(file.path, f"archive headers disagree about {info.filename}")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > file.size:
        raise CheckpointError(file.path, f"truncated: {info.filename} runs past the end")
    return start


class KerasWriter(Writer):
    """Streams a new archive: the newest input's other members, then the averaged weights."""

    def __init__(
        self, template: KerasCheckpoint, tmp_path: str, keep: Callable[[str], bool] | None
    ) -> None:
        self._skeleton_path = f"{tmp_path}-weights.h5"
        self._skeleton_fd: int | None = None
        self._archive: zipfile.ZipFile | None = None
        self.offsets, copied = lay_out_output(template, self._skeleton_path, keep)
        if copied:
            # The newest input's weights member, byte for byte outside the averaged tensors.
            start, self._skeleton_size = template.weights_bytes()
            self._read_skeleton = lambda at, n: template.file.read_at(start + at, n)
        else:
            self._skeleton_fd = fd = os.open(self._skeleton_path, os.O_RDONLY)
            self._skeleton_size = os.fstat(fd).st_size
            self._read_skeleton = lambda at, n: os.pread(fd, n, at)
        self.order = sorted(self.offsets, key=self.offsets.__getitem__)
        self._out = open(tmp_path, "wb")  # noqa: SIM115 - closed in finish()/close()
        self._archive = zipfile.ZipFile(self._out, "w", allowZip64=True)
        for name, info in template.members.items():
            if name != WEIGHTS:
                self._archive.writestr(_copy_info(info), template.read_member(name))
        weights_info = _copy_info(template.members[WEIGHTS])
        weights_info.compress_type = zipfile.ZIP_STORED
        self._stream = self._archive.open(weights_info, "w", force_zip64=True)
        self._pos = 0

    def write(self, tensor: Tensor, start: int, data: np.ndarray) -> None:
        offset = self.offsets[tensor.name] + start * tensor.storage.itemsize
        self._copy_skeleton(offset)
        payload = as_bytes(data)
        self._stream.write(payload)
        self._pos = offset + len(payload)

    def _copy_skeleton(self, until: int) -> None:
        assert until >= self._pos
        while self._pos < until:
            chunk = self._read_skeleton(self._pos, min(COPY_BLOCK, until - self._pos))
            if not chunk:  # past the skeleton's end: unwritten space reads as zeros
                chunk = bytes(min(COPY_BLOCK, until - self._pos))
            self._stream.write(chunk)
            self._pos += len(chunk)

    def finish(self) -> int:
        self._copy_skeleton(self._skeleton_size)
        self._stream.close()
        assert self._archive is not None
        self._archive.close()
        self._archive = None
        self._out.flush()
        os.fsync(self._out.fileno())
        size = os.fstat(self._out.fileno()).st_size
        self._out.close()
        return size

    def close(self) -> None:
        if self._archive is not None:
            # The member's write handle first: a ZipFile left with one open complains (with
            # a traceback on stderr) when it is garbage-collected.
            with contextlib.suppress(Exception):
                self._stream.close()
            with contextlib.suppress(Exception):
                self._archive.close()
            self._archive = None
        self._out.close()
        if self._skeleton_fd is not None:
            os.close(self._skeleton_fd)
            self._skeleton_fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._skeleton_path)


def _copy_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
    new.compress_type = info.compress_type
    new.external_attr = info.external_attr
    return new
