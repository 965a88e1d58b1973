"""Copy a checkpoint with some of its averaged tensors given new values, in its own format.

The copy goes through the format's own writer (`Checkpoint.output`), so it is committed
atomically and is the source's bytes everywhere except the replaced tensors' values. This
module knows no Keras: callers name the tensors (as `Checkpoint.tensors` does) and the values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from wavg.errors import OutputError, UsageError
from wavg.formats.registry import iter_blocks, open_checkpoint
from wavg.storage.atomic import check_output_dir

# Items read per block when copying the tensors that keep their values (as combine does).
_BLOCK_ITEMS = 1 << 20


def rewrite_tensors(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    replacements: Mapping[str, np.ndarray],
) -> int:
    """Write `out`: a copy of checkpoint `src` in which each named tensor holds the new value.

    Names are the checkpoint's tensor names (e.g. ``model_weights/bn/bn/moving_mean:0`` or
    ``layers/batch_normalization/vars/2``) and must be averaged (model, floating-point)
    tensors; each value must have the tensor's shape and is rounded once to its dtype. Every
    other byte of `out` is `src`'s. Returns the bytes written. Raises `UsageError` for an
    unknown name or a wrong shape, `OutputError` when `out` cannot be written, and
    `CheckpointError` when `src` is unusable or changes while it is read; `out` is then
    untouched.
    """
    out_path = Path(out)
    refuse_same_file(Path(src), out_path)
    check_output_dir(out_path)
    ckpt = open_checkpoint(os.fspath(src))
    try:
        values = _checked_values(ckpt, replacements)
        scratch = np.empty(_BLOCK_ITEMS * 8, np.uint8)
        try:
            with ckpt.output(out_path, None) as writer:
                for name in writer.order:
                    tensor = ckpt.tensors[name]
                    new = values.get(name)
                    if new is not None:
                        writer.write(tensor, 0, new)
                        continue
                    for start, count, slices in iter_blocks(tensor.shape, 1, _BLOCK_ITEMS):
                        block = ckpt.read(tensor, start, count, slices, scratch)
                        writer.write(tensor, start, block.view(tensor.storage))
                ckpt.file.check_unchanged()
                return writer.finish()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise OutputError(out_path, f"cannot write ({reason})") from None
    finally:
        ckpt.close()


def _checked_values(ckpt, replacements: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each replacement flattened, in its tensor's storage type, after checking name and shape."""
    values = {}
    for name, value in replacements.items():
        tensor = ckpt.tensors.get(name)
        if tensor is None or not tensor.averaged:
            raise UsageError(f"{ckpt.path}: has no floating-point model tensor {name}")
        array = np.asarray(value)
        if array.shape != tensor.shape:
            raise UsageError(
                f"{ckpt.path}: tensor {name} has shape {tensor.shape}, the new value {array.shape}"
            )
        flat = np.ascontiguousarray(array, dtype=np.float64).reshape(-1)
        values[name] = flat.astype(tensor.dtype).view(tensor.storage)
    return values


def refuse_same_file(src: Path, out: Path) -> None:
    """A usage error if `out` is `src` itself (also through a link): inputs are never
    overwritten."""
    try:
        same = out.exists() and os.path.samefile(src, out)
    except OSError:
        same = False
    if same:
        raise UsageError(f"output {out} is the input {src}; inputs are never overwritten")


def read_tensor(ckpt, name: str) -> np.ndarray:
    """The whole of one tensor of an open checkpoint, in its numeric dtype and shape."""
    tensor = ckpt.tensors[name]
    result = np.empty(tensor.size, tensor.dtype)
    scratch = np.empty(_BLOCK_ITEMS * 8, np.uint8)
    for start, count, slices in iter_blocks(tensor.shape, 1, _BLOCK_ITEMS):
        result[start : start + count] = ckpt.read(tensor, start, count, slices, scratch)
    return result.reshape(tensor.shape)
