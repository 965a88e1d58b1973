"""Orbax steps as checkpoints: zarr3 arrays in an OCDBT store, read and written by TensorStore.

A step's float ``trainable_variables`` and ``non_trainable_variables`` are averaged chunk by
chunk (a read decodes whole chunks, so a block is one chunk and memory is bounded by the
largest per-device shard); the output is a new root holding one step, written under a
temporary name and renamed (in a bucket: uploaded with the step's markers last). This module
never imports jax or orbax, and TensorStore only when an Orbax input is met.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wavg._runtime import signals_held
from wavg.errors import (
    CheckpointError,
    CheckpointMismatch,
    InputChanged,
    OutputError,
    UnsafeCheckpoint,
    WavgError,
)
from wavg.formats.base import (
    EXPANSION_FLOOR_BYTES,
    MAX_EXPANSION,
    Checkpoint,
    Tensor,
    Writer,
    bfloat16,
)
from wavg.formats.keras_folder.commit import folder_output
from wavg.formats.layouts import Layout
from wavg.formats.orbax.steps import COMMIT_MARKER, PYTREE, StepFiles, StepUrl
from wavg.formats.quantized import HINT as QUANTIZED_HINT
from wavg.formats.quantized import QuantizedCheckpoint
from wavg.storage.atomic import fsync_directory
from wavg.storage.local_target import LocalTarget
from wavg.storage.locations import is_plain_relative_path
from wavg.storage.remote import scrub
from wavg.storage.target import target_for

if TYPE_CHECKING:
    from wavg.formats.orbax.remote import RemoteStepFiles

AVERAGED_GROUPS = ("trainable_variables", "non_trainable_variables")
OPTIMIZER_GROUP = "optimizer_variables"
MODEL_CONFIG = "model_config/_strings.json"
# Bytes of output blocks staged in memory before they are committed to the output store.
WRITE_BATCH_BYTES = 64 << 20
_PYTREE_METADATA = ("_METADATA", "_sharding", "array_metadatas")
INSTALL_HINT = (
    "reading Orbax checkpoints needs TensorStore: pip install '.[orbax]' in wavg's source folder"
)


class OrbaxLayout(Layout):
    """Orbax names arrays by tree path joined with dots (``optimizer_variables.adam.m``)."""

    def is_optimizer(self, name: str) -> bool:
        return name.startswith(f"{OPTIMIZER_GROUP}.")


ORBAX = OrbaxLayout("orbax", OPTIMIZER_GROUP, ())


def _tensorstore(path: str) -> Any:
    try:
        import tensorstore
    except ImportError:
        raise CheckpointError(path, INSTALL_HINT) from None
    return tensorstore


def _message(exc: BaseException) -> str:
    """TensorStore's reason on one line, short, without URL secrets or credentials (a
    remote step's errors carry the server's answer)."""
    return scrub(exc) if str(exc).strip() else type(exc).__name__


class OrbaxStep(Checkpoint):
    """One committed step directory of an OrbaxCheckpoint root."""

    def __init__(self, path: str | StepUrl) -> None:
        ts = _tensorstore(str(path))
        if isinstance(path, StepUrl):
            from wavg.formats.orbax.remote import RemoteStepFiles

            files: StepFiles | RemoteStepFiles = RemoteStepFiles(path.url)
        else:
            files = StepFiles(path)
        super().__init__(files, ORBAX)
        self.ts = ts
        self.files = files
        self.context = ts.Context({"cache_pool": {"total_bytes_limit": 0}, **files.context()})
        self.config = files.read(MODEL_CONFIG)
        meta = _read_json(files, f"{PYTREE}/_METADATA", self.path)
        if meta.get("use_ocdbt") is not True or meta.get("use_zarr3") is not True:
            raise CheckpointError(
                self.path, "is an Orbax step without OCDBT/zarr3 storage; wavg reads only those"
            )
        self.names = _array_names(meta, self.path)
        self.kvstore = {"driver": "ocdbt", "base": files.kvstore(PYTREE)}
        stored = self._check_locations()
        if not isinstance(files, StepFiles):
            files.size = stored  # what TensorStore may read: the tree and the values it names
        self.stores: dict[str, Any] = {}
        self.chunks: dict[str, tuple[int, ...]] = {}
        # Opened all at once: each open reads a zarr.json, and TensorStore overlaps them.
        opening = {name: self._start_open(name) for name in self.names}
        for name, future in opening.items():
            self.tensors[name] = self._open_array(name, future)
        _refuse_quantized(self)
        declared = sum(t.nbytes for t in self.tensors.values())
        if declared > EXPANSION_FLOOR_BYTES and declared > MAX_EXPANSION * self.file.size:
            raise UnsafeCheckpoint(
                self.path,
                f"its arrays declare {declared} bytes but the step stores only "
                f"{self.file.size}; refusing a decompression bomb",
            )

    def _check_locations(self) -> int:
        """Every node and value of the OCDBT tree must lie in a file inside the step.
        Returns the bytes the tree's nodes and values take."""
        kv = _result(
            self.ts.KvStore.open(self.kvstore["base"], context=self.context),
            self.path,
            "cannot open its OCDBT store",
        )
        manifest = _result(self.ts.ocdbt.dump(kv), self.path, "damaged OCDBT manifest")
        pending = list(_locations(manifest))
        seen: set[str] = set()
        stored = 0
        while pending:
            location = pending.pop()
            kind, file = _parse_location(location, self.path)
            if location in seen:
                continue
            seen.add(location)
            stored += _location_length(location)
            if kind != "btreenode":
                continue
            node = _result(
                self.ts.ocdbt.dump(kv, location), self.path, f"damaged OCDBT node in {file}"
            )
            pending.extend(_locations(node))
        return stored

    def _start_open(self, name: str) -> Any:
        spec = {"driver": "zarr3", "kvstore": {**self.kvstore, "path": f"{name}/"}}
        return self.ts.open(spec, open=True, read=True, context=self.context)

    def _open_array(self, name: str, opening: Any) -> Tensor:
        store = _result(opening, self.path, f"array {name}: missing or damaged")
        storage = np.dtype(store.dtype.numpy_dtype)
        shape = tuple(int(n) for n in store.domain.shape)
        if any(lo != 0 for lo in store.domain.inclusive_min):
            raise CheckpointError(self.path, f"array {name}: its domain does not start at 0")
        group = name.split(".", 1)[0]
        self.stores[name] = store
        self.chunks[name] = tuple(int(n) for n in store.chunk_layout.read_chunk.shape or shape)
        return Tensor(
            name=name,
            shape=shape,
            dtype=storage,
            storage=storage,
            averaged=(storage.kind == "f" or storage == bfloat16()) and group in AVERAGED_GROUPS,
            offset=None,
        )

    def blocks(self, tensor: Tensor, budget: int) -> Iterator[tuple[int, int, tuple[slice, ...]]]:
        """One block per stored chunk: TensorStore decodes whole chunks, so a smaller block
        would decode each chunk several times and a larger one hold several at once."""
        return chunk_boxes(tensor.shape, self.chunks[tensor.name])

    def read(
        self, tensor: Tensor, start: int, count: int, slices: tuple[slice, ...], scratch: np.ndarray
    ) -> np.ndarray:
        return self.finish_read(tensor, slices, self.start_read(tensor, slices))

    def start_read(self, tensor: Tensor, slices: tuple[slice, ...]) -> Any:
        """Start reading a block; `finish_read` waits for it (reads can overlap)."""
        return self.stores[tensor.name][slices].read()

    def finish_read(self, tensor: Tensor, slices: tuple[slice, ...], reading: Any) -> np.ndarray:
        data = _result(reading, self.path, f"cannot read array {tensor.name}")
        flat = np.ascontiguousarray(data).reshape(-1)
        count = math.prod(s.stop - s.start for s in slices)
        if flat.size != count or flat.dtype != tensor.storage:
            raise CheckpointError(self.path, f"array {tensor.name} changed while it was read")
        return flat.view(tensor.dtype)

    def check_matches(self, newest: Checkpoint) -> None:
        other = newest.config if isinstance(newest, OrbaxStep) else None
        if self.config != other:
            raise CheckpointMismatch(
                self.path, f"was saved from another model config than {newest.path}"
            )

    def check_output(self, out: Path) -> None:
        """The output is a new root: on disk a directory that does not exist yet (an empty
        one is fine), in a bucket a prefix that holds nothing (see `orbax.bucket`)."""
        target = target_for(out)
        if not isinstance(target, LocalTarget):
            from wavg.formats.orbax.bucket import check_new_root

            check_new_root(target)
            return
        if not out.parent.is_dir():
            raise OutputError(out, f"directory {out.parent} does not exist")
        if out.is_symlink() or (out.exists() and not (out.is_dir() and not any(out.iterdir()))):
            raise OutputError(
                out, "exists; an Orbax output is a new directory (remove it or pick another name)"
            )

    @contextlib.contextmanager
    def output(self, out: Path, keep: Callable[[str], bool] | None) -> Iterator[Writer]:
        """Write a new root at `out` holding this step's number. On disk it takes `out`'s
        place as a model folder does (`keras_folder.commit.folder_output`): built whole under
        a temporary name, fsynced, swapped in; removed on failure, and a killed run's
        leftover removed by the next run for `out`. In a bucket it is built in a local
        staging folder and uploaded with the step's markers last (`orbax.bucket.new_root`).
        """
        self.check_output(out)  # first: its own words for a file or a folder in the way
        target = target_for(out)
        step = self.files.name
        if isinstance(target, LocalTarget):
            folder = folder_output(
                out, lambda _names: self.check_output(out), last=(), kind="directory"
            )
        else:
            from wavg.formats.orbax.bucket import new_root

            folder = new_root(target, step)
        with folder as tmp:
            writer = OrbaxWriter(self, tmp, f"{target.display}/{step}", keep)
            try:
                yield writer
            finally:
                writer.close()


class OrbaxWriter(Writer):
    """Builds the output step: the newest step's metadata, its arrays copied or averaged."""

    def __init__(
        self,
        template: OrbaxStep,
        tmp_root: Path,
        final_step: str,
        keep: Callable[[str], bool] | None,
    ) -> None:
        self.template = template
        self.root = tmp_root
        self.final_step = final_step  # where the step is committed, as its markers say
        self.step = tmp_root / template.files.name
        self.stores: dict[str, Any] = {}
        # Writes are staged in a transaction and committed every WRITE_BATCH_BYTES: each
        # OCDBT commit writes a new B-tree, so one commit per small array would be slow and
        # leave a store many times the data's size.
        self._ts = template.ts
        self._txn = self._ts.Transaction()
        self._committing: Any = None
        self._staged = 0
        self.order: list[str] = []
        try:
            self._start([n for n in template.names if keep is None or keep(n)])
        except BaseException:
            self.close()  # a commit may be under way (see close)
            raise

    def _start(self, kept: list[str]) -> None:
        """Lay out the step: metadata, every array created, the copied arrays written."""
        template, ts = self.template, self._ts
        _copy_metadata(template.files, self.step, set(kept))
        self.context = ts.Context()
        base = {
            "driver": "ocdbt",
            "base": _file_kvstore(self.step / PYTREE),
            "config": _ocdbt_config(template),
        }
        opening = {}
        for name in kept:
            spec = {
                "driver": "zarr3",
                "kvstore": {**base, "path": f"{name}/"},
                "metadata": template.stores[name].spec().to_json()["metadata"],
                # As Orbax does: Orbax reads a missing chunk as an error, not as zeros.
                "store_data_equal_to_fill_value": True,
            }
            opening[name] = _ts_call(
                lambda spec=spec: ts.open(
                    spec, create=True, context=self.context, transaction=self._txn
                )
            )
        for name, future in opening.items():
            self.stores[name] = _ts_call(future.result)
        self._commit()
        self.order = [n for n in kept if template.tensors[n].averaged]
        self._copy([template.tensors[n] for n in kept if not template.tensors[n].averaged])

    def _copy(self, tensors: list[Tensor]) -> None:
        """Copy `tensors` from the newest step, reading up to WRITE_BATCH_BYTES at once
        (many small arrays: one read after another would wait on each)."""
        blocks = deque(
            (t, slices, count * t.storage.itemsize)
            for t in tensors
            for _, count, slices in self.template.blocks(t, 0)
        )
        while blocks:
            batch, size = [], 0
            while blocks and (not batch or size + blocks[0][2] <= WRITE_BATCH_BYTES):
                tensor, slices, nbytes = blocks.popleft()
                batch.append((tensor, slices, self.template.start_read(tensor, slices)))
                size += nbytes
            for tensor, slices, reading in batch:
                self._store(tensor, slices, self.template.finish_read(tensor, slices, reading))

    def _store(self, tensor: Tensor, slices: tuple[slice, ...], data: np.ndarray) -> None:
        shape = tuple(s.stop - s.start for s in slices)
        array = data.view(tensor.storage).reshape(shape)
        store = self.stores[tensor.name].with_transaction(self._txn)
        _ts_call(lambda: store[slices].write(array).result())
        self._staged += array.nbytes
        if self._staged >= WRITE_BATCH_BYTES:
            self._commit()

    def _commit(self) -> None:
        txn, self._txn, self._staged = self._txn, self._ts.Transaction(), 0
        self._committing = txn.commit_async()
        _ts_call(self._committing.result)
        self._committing = None

    def write(self, tensor: Tensor, start: int, data: np.ndarray) -> None:
        chunk = self.template.chunks[tensor.name]
        self._store(tensor, box_at(tensor.shape, chunk, start), data)

    def finish(self) -> int:
        self._commit()
        marker = f"Checkpoint commit was successful to {self.final_step}"
        for directory in (self.step / PYTREE, self.step / "model_config", self.step):
            if directory.is_dir():
                (directory / COMMIT_MARKER).write_text(marker)
        return _fsync_tree(self.root)

    def close(self) -> None:
        # An interrupted commit goes on in TensorStore's threads: wait for it, or it would
        # write into the temporary root after its removal.
        with signals_held():
            if self._committing is not None:
                with contextlib.suppress(Exception):
                    self._committing.result()
            with contextlib.suppress(Exception):
                self._txn.abort()  # nothing staged survives a failure
        self.stores.clear()


def chunk_boxes(
    shape: tuple[int, ...], chunk: tuple[int, ...]
) -> Iterator[tuple[int, int, tuple[slice, ...]]]:
    """The chunks of a C-ordered array as ``(flat index of the corner, items, slices)``."""
    if math.prod(shape) == 0:
        return
    grid = [range(0, n, max(1, c)) for n, c in zip(shape, chunk, strict=True)]
    for corner in _product(grid):
        slices = tuple(
            slice(lo, min(lo + max(1, c), n)) for lo, c, n in zip(corner, chunk, shape, strict=True)
        )
        count = math.prod(s.stop - s.start for s in slices)
        start = int(np.ravel_multi_index(corner, shape)) if shape else 0
        yield start, count, slices


def box_at(shape: tuple[int, ...], chunk: tuple[int, ...], start: int) -> tuple[slice, ...]:
    """The slices of the chunk whose corner has flat index `start` (see `chunk_boxes`)."""
    if not shape:
        return ()
    corner = np.unravel_index(start, shape)
    return tuple(
        slice(int(lo), min(int(lo) + max(1, c), n))
        for lo, c, n in zip(corner, chunk, shape, strict=True)
    )


def _product(ranges: list[range]) -> Iterator[tuple[int, ...]]:
    if not ranges:
        yield ()
        return
    for head in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (head, *rest)


def _file_kvstore(directory: Path) -> dict:
    """A TensorStore spec for a local directory (a JSON spec, not a URL: a URL would
    percent-decode a path holding ``%`` or stop at a ``#``)."""
    return {"driver": "file", "path": f"{directory.resolve()}/"}


def _ts_call(call: Callable[[], Any]) -> Any:
    """Run a TensorStore write; its failures become `OSError`, which the caller reports
    against the output (disk full, permission denied ...)."""
    try:
        return call()
    except OSError:
        raise
    except WavgError:
        raise  # an interruption (SIGINT/SIGTERM) raised while TensorStore waited
    except Exception as exc:
        raise OSError(errno.EIO, _message(exc)) from None


def _result(future: Any, path: str, problem: str) -> Any:
    """What a TensorStore future gives; its failure is a `CheckpointError` naming `path`
    and `problem` (with TensorStore's reason), an interruption passes through as it is."""
    try:
        return future.result()
    except WavgError:
        raise  # an interruption (SIGINT/SIGTERM) raised while TensorStore waited
    except Exception as exc:
        raise CheckpointError(path, f"{problem} ({_message(exc)})") from None


def _read_json(files: StepFiles | RemoteStepFiles, key: str, step: str) -> dict:
    name = key.rsplit("/", 1)[-1]
    try:
        raw = files.read(key)
        if raw is None:
            raise CheckpointError(step, f"{name} is missing (not a complete Orbax step)")
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise CheckpointError(step, f"{name} is damaged ({_message(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(step, f"{name} is damaged (not a JSON object)")
    return data


def _array_names(meta: dict, step: str) -> list[str]:
    """The arrays of the step, from the tree in ``pytree/_METADATA`` (Orbax joins a tree
    path's keys with dots)."""
    tree = meta.get("tree_metadata")
    if not isinstance(tree, dict) or not tree:
        raise CheckpointError(step, "pytree/_METADATA lists no arrays")
    names = []
    for entry in tree.values():
        try:
            keys = [str(k["key"]) for k in entry["key_metadata"]]
            if not _holds_array(entry):
                continue  # an empty container, e.g. the non-trainable variables of an MLP
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(step, "pytree/_METADATA is damaged (bad tree entry)") from None
        name = ".".join(keys)
        if not name or "/" in name or name.startswith(".") or not name.isprintable():
            raise UnsafeCheckpoint(step, f"pytree/_METADATA names an unusable array {name!r}")
        names.append(name)
    if len(set(names)) != len(names):
        raise CheckpointError(step, "pytree/_METADATA lists an array twice")
    return names


def _refuse_quantized(step: OrbaxStep) -> None:
    """An 8-bit integer matrix among the model's variables is a quantized kernel: its
    float scales would be averaged and the kernel copied, a model that is neither an
    average nor any input. Refused, whatever ``--quantized`` says (Orbax steps are not
    requantized)."""
    for tensor in step.tensors.values():
        group = tensor.name.split(".", 1)[0]
        integer8 = tensor.storage.kind in "iu" and tensor.storage.itemsize == 1
        if group in AVERAGED_GROUPS and integer8 and len(tensor.shape) >= 2:
            raise QuantizedCheckpoint(
                step.path,
                f"tensor {tensor.name} is quantized ({tensor.storage}); averaging quantized "
                f"weights gives a model that is no average of the run: {QUANTIZED_HINT} "
                "(Orbax steps are not requantized)",
            )


def _holds_array(entry: dict) -> bool:
    return entry.get("value_metadata", {}).get("skip_deserialize") is not True


def _locations(node: Any) -> Iterator[str]:
    """Every ``location`` string in a dumped OCDBT manifest or node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "location" and isinstance(value, str):
                yield value
            else:
                yield from _locations(value)
    elif isinstance(node, list):
        for item in node:
            yield from _locations(item)


def _location_length(location: str) -> int:
    """The byte count a parsed ``<kind>:<base>:<relative>:<offset>:<length>`` names."""
    length = location.rsplit(":", 1)[-1]
    return int(length) if length.isdigit() else 0


def _parse_location(location: str, step: str) -> tuple[str, str]:
    """``<kind>:<base path>:<relative path>:<offset>:<length>`` -> kind and file; the file
    must be a plain relative path inside the store."""
    parts = location.split(":")
    if len(parts) != 5:
        raise CheckpointError(step, f"damaged OCDBT reference {location!r}")
    kind, base, relative = parts[0], parts[1], parts[2]
    file = base + relative
    if not is_plain_relative_path(file):
        raise UnsafeCheckpoint(step, f"its OCDBT store points outside the step ({file})")
    return kind, file


def _ocdbt_config(template: OrbaxStep) -> dict:
    """The input store's OCDBT settings (Orbax's), less its identity."""
    try:
        config = dict(next(iter(template.stores.values())).spec().to_json()["kvstore"]["config"])
    except (StopIteration, KeyError):
        config = {}
    config.pop("uuid", None)
    return config


def _copy_metadata(files: StepFiles | RemoteStepFiles, step: Path, kept: set[str]) -> None:
    """Copy the step's metadata files; the tree, sharding and array lists keep `kept` only.
    (The keys are plain relative paths: `StepFiles` walks the directory, and
    `RemoteStepFiles` refuses any other name.)"""
    step.mkdir()
    for key in files.file_keys():
        parts = key.split("/")
        if parts[0] == PYTREE and len(parts) > 1 and parts[1] not in _PYTREE_METADATA:
            continue  # the OCDBT store itself is written anew
        if parts[-1] == COMMIT_MARKER:
            continue  # written last, by finish()
        data = files.read(key)
        if data is None:
            raise InputChanged(files.path, "changed while it was being read")
        if parts[0] == PYTREE:
            data = _filter_metadata(parts[-1], parts[1], data, kept)
        target = step.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (step / PYTREE).mkdir(exist_ok=True)


def _filter_metadata(name: str, kind: str, data: bytes, kept: set[str]) -> bytes:
    """Drop the entries of arrays not in `kept` from an Orbax pytree metadata file."""
    meta = json.loads(data)
    if kind == "_METADATA":
        tree = meta["tree_metadata"]
        meta["tree_metadata"] = {
            k: v
            for k, v in tree.items()
            if not _holds_array(v) or ".".join(str(e["key"]) for e in v["key_metadata"]) in kept
        }
    elif kind == "_sharding":
        import base64

        meta = {k: v for k, v in meta.items() if base64.b64decode(k).decode() in kept}
    elif kind == "array_metadatas":
        meta["array_metadatas"] = [
            m for m in meta["array_metadatas"] if m["array_metadata"]["param_name"] in kept
        ]
    return json.dumps(meta).encode()


def _fsync_tree(root: Path) -> int:
    """fsync every file and directory under `root`; return the bytes of its files."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
        fsync_directory(Path(directory))
    return total
