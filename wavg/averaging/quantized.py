"""What ``combine`` does with quantized layers: refuse them, or average and requantize them.

By default a checkpoint holding quantized layers is refused (`refuse_quantized`). With
``quantized="requantize"`` each int8/int4 layer's kernel is dequantized per input with that
input's own scales, averaged in float64 like every other tensor, rounded to float32 and
quantized again as Keras would (`wavg.averaging.requantize`); its kernel, scale and zero-point tensors
are then produced here instead of by the block averager. It never touches a float tensor
that is not a quantized layer's scale: biases, ``g_idx`` and the rest are averaged as usual.

Memory: every input's scales and zero points of the layer being written (one per output
channel or group, small next to the kernel), the new scales, and one block of rows per input
at a time. A per-channel scale needs the whole reduction axis, so the kernels are read twice:
once for the statistics, once to quantize.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from wavg.averaging.requantize import Statistics, dequantize, quantize
from wavg.errors import CheckpointError, CheckpointMismatch, UsageError
from wavg.formats.base import Checkpoint, Tensor, iter_blocks
from wavg.formats.quantized import (
    Geometry,
    QuantizedLayer,
    find_quantized,
    geometry,
    read_all,
    refuse_quantized,
)

POLICIES = ("refuse", "requantize")


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise UsageError(f"quantized must be one of {', '.join(POLICIES)}, not {policy!r}")


def _found_layers(inputs: list[Checkpoint]) -> list[list[QuantizedLayer]]:
    """`find_quantized` of every input; the newest's config is always read.

    An older input whose tensors are the very objects of one already looked at (it shares
    that input's verified structure, see `Hdf5Checkpoint._predict_from`) shows the same layout,
    so a layout that shows no quantized layer is not searched again.
    """
    plain: set[tuple[int, ...]] = set()
    found = []
    for ckpt in inputs:
        newest = ckpt is inputs[-1]
        key = tuple(map(id, ckpt.tensors.values()))
        if not newest and key in plain:
            found.append([])
            continue
        layers = find_quantized(ckpt, always_config=newest)
        if not layers and not newest:
            plain.add(key)
        found.append(layers)
    return found


def plan_quantized(
    inputs: list[Checkpoint], weights: list[float], policy: str, block_items: int
) -> Requantizer | None:
    """Refuse quantized inputs, or return the `Requantizer` for them (None: nothing is
    quantized). Every input must hold the same quantized layers, laid out alike."""
    check_policy(policy)
    found = _found_layers(inputs)
    if policy == "refuse":
        for ckpt, layers in zip(inputs, found, strict=True):
            refuse_quantized(ckpt, layers)
        return None
    newest = inputs[-1]
    if not any(found):
        return None
    jobs = []
    per_input = [{layer.group: layer for layer in layers} for layers in found]
    for layer in found[-1]:
        geo = geometry(newest, layer)
        members = []
        for ckpt, layers, w in zip(inputs, per_input, weights, strict=True):
            mine = layers.get(layer.group)
            if mine is None:
                raise CheckpointMismatch(
                    ckpt.path, f"tensor {layer.example} is quantized in {newest.path} but not here"
                )
            if ckpt is not newest:
                _same_layout(ckpt, mine, geometry(ckpt, mine), newest, layer, geo)
            if w > 0:
                members.append((ckpt, w, mine))
        jobs.append(_Job(layer, geo, members))
    for ckpt, layers in zip(inputs, per_input, strict=True):
        extra = next((g for g in layers if g not in {j.layer.group for j in jobs}), None)
        if extra is not None:
            raise CheckpointMismatch(
                ckpt.path,
                f"tensor {layers[extra].example} is quantized here but not in {newest.path}",
            )
    return Requantizer(jobs, block_items)


def _same_layout(
    ckpt: Checkpoint,
    mine: QuantizedLayer,
    geo: Geometry,
    newest: Checkpoint,
    ref: QuantizedLayer,
    ref_geo: Geometry,
) -> None:
    for a, b in ((mine.kernel, ref.kernel), (mine.zero, ref.zero)):
        if (a is None) != (b is None) or (
            a is not None and (a.shape, a.storage) != (b.shape, b.storage)
        ):  # type: ignore[union-attr]
            name = (a or b).name  # type: ignore[union-attr]
            raise CheckpointMismatch(
                ckpt.path, f"tensor {name} differs in shape or type from {newest.path}"
            )
    if geo != ref_geo:
        raise CheckpointMismatch(
            ckpt.path, f"tensor {ref.example} is quantized differently in {newest.path}"
        )


@dataclasses.dataclass
class _Job:
    layer: QuantizedLayer  # as found in the newest checkpoint
    geo: Geometry
    members: list[tuple[Checkpoint, float, QuantizedLayer]]  # inputs of weight > 0
    result: tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None = None
    inputs_scales: list[tuple[np.ndarray, np.ndarray | None]] | None = None


class Requantizer:
    """Produces the kernel, scale and zero-point tensors of every requantized layer."""

    def __init__(self, jobs: list[_Job], block_items: int) -> None:
        self.block_items = block_items
        self._owner: dict[str, tuple[_Job, str]] = {}
        for job in jobs:
            layer = job.layer
            self._owner[layer.kernel.name] = (job, "kernel")
            self._owner[layer.scale.name] = (job, "scale")  # type: ignore[union-attr]
            if layer.zero is not None:
                self._owner[layer.zero.name] = (job, "zero")
        self.layers = len(jobs)

    def written_tensors(self) -> list[str]:
        """Names of the integer tensors this writes (the core must give them to the writer)."""
        return [name for name, (_, role) in self._owner.items() if role != "scale"]

    def owns(self, name: str) -> bool:
        return name in self._owner

    def blocks(self, tensor: Tensor) -> Iterator[tuple[Tensor, int, np.ndarray]]:
        """The output blocks of `tensor` (one of `owns`), in order."""
        job, role = self._owner[tensor.name]
        scale, zero_f, zero_i = self._result(job)
        if role == "scale":
            yield tensor, 0, scale.reshape(-1)
        elif role == "zero":
            yield tensor, 0, zero_i.reshape(-1)  # type: ignore[union-attr]
        else:
            for start, row0, _, average in self._averaged_rows(job):
                yield tensor, start, quantize(average, job.geo, scale, zero_f, row0)

    def _result(self, job: _Job) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if job.result is None:
            stats = Statistics(job.geo)
            for _, row0, _, average in self._averaged_rows(job):
                stats.update(average, row0)
            job.result = stats.finish()
        return job.result

    def _scales(self, job: _Job) -> list[tuple[np.ndarray, np.ndarray | None]]:
        if job.inputs_scales is None:
            job.inputs_scales = [
                _read_scales(ckpt, layer, job.geo) for ckpt, _, layer in job.members
            ]
        return job.inputs_scales

    def _averaged_rows(self, job: _Job) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """(flat start in the stored kernel, first row, rows, float32 average rows)."""
        geo = job.geo
        scales = self._scales(job)
        shape = job.layer.kernel.shape
        # A quarter of the core's block: each row block lives as several float64 copies.
        budget = max(self.block_items // 4, geo.stored_cols)
        for start, count, slices in iter_blocks(shape, 1, budget):
            row0, rows = start // geo.stored_cols, count // geo.stored_cols
            acc = np.zeros((rows, geo.cols), np.float64)
            total = 0.0
            for (ckpt, w, layer), (scale, zero) in zip(job.members, scales, strict=True):
                scratch = np.empty(count, np.uint8)
                stored = ckpt.read(layer.kernel, start, count, slices, scratch)
                values = dequantize(stored, geo, scale, zero, row0)
                total += w
                acc += values if w == 1.0 else values * w
            acc /= total
            yield start, row0, rows, acc.astype(np.float32)


def _read_scales(
    ckpt: Checkpoint, layer: QuantizedLayer, geo: Geometry
) -> tuple[np.ndarray, np.ndarray | None]:
    scale = read_all(ckpt, layer.scale)  # type: ignore[arg-type]
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise CheckpointError(
            ckpt.path,
            f"tensor {layer.scale.name} holds a zero, negative or non-finite scale",  # type: ignore[union-attr]
        )
    zero = None
    if layer.zero is not None:
        zero = read_all(ckpt, layer.zero)
        low, high = -8, 7
        if zero.size and (zero.min() < low or zero.max() > high):
            raise CheckpointError(
                ckpt.path, f"tensor {layer.zero.name} holds zero points outside int4 [-8, 7]"
            )
    if geo.block_size is not None:
        shape = (geo.groups, geo.cols) if geo.axis == 0 else (geo.rows, geo.groups)
        scale = scale.reshape(shape)
        zero = zero.reshape(shape)  # type: ignore[union-attr]
    return scale, zero


def mark_written(newest: Checkpoint, requantizer: Requantizer) -> None:
    """Flag the integer tensors the requantizer writes as produced by the core, so the
    output's writer lays them out and takes their blocks."""
    for name in requantizer.written_tensors():
        newest.tensors[name] = dataclasses.replace(newest.tensors[name], averaged=True)
