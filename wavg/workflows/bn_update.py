"""`wavg bn-update`: give an averaged model the BatchNormalization statistics of its own weights.

Averaging the moving means and variances of several checkpoints does not give the statistics
of the averaged weights, so this module runs one pass over training inputs and writes a copy
of the checkpoint whose BN moving statistics are recomputed (PyTorch's ``update_bn``). It
loads models only through `wavg.workflows.model_loading` and writes only through
`wavg.averaging.rewrite`; it never imports TensorFlow (only Keras' backend-neutral API).

Semantics. The inputs are taken in file order in batches of ``batch_size`` (the last may be
smaller). Every trainable BatchNormalization layer runs in training mode (it normalises with
the batch's own statistics, as in training) while every other layer runs in inference mode,
so Dropout and other random layers are off and a second run gives the same bytes. For each
layer, the new moving mean is the average over batches of the batch mean, and the new moving
variance the average over batches of the batch variance as Keras computes it (the biased
variance, over every axis but the channel axis); every batch counts equally, as with
``update_bn``'s cumulative average. The statistics are summed in float64 and rounded once
to the variable's dtype. Layers with ``trainable=False`` (frozen, as in fine-tuning) keep
their statistics and normalise with them.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wavg.averaging.rewrite import read_tensor, refuse_same_file, rewrite_tensors
from wavg.errors import CheckpointError, UsageError
from wavg.formats.layouts import KERAS3_WEIGHTS, KERAS_ARCHIVE, LEGACY_MODEL
from wavg.formats.registry import Checkpoint, open_checkpoint
from wavg.workflows.data import Dataset, check_inputs_fit, load_data

BATCH_SIZE = 32  # Keras' default batch size, the one models are usually trained with
_MODEL_LAYOUTS = (LEGACY_MODEL, KERAS_ARCHIVE, KERAS3_WEIGHTS)


@dataclass
class BnPlan:
    """Which BatchNormalization layers a model has and where their statistics lie in a file.

    `tensors[i]` names the checkpoint tensors holding ``layers[i]``'s moving mean and moving
    variance, in the layout of the file the plan was made for.
    """

    layers: list[Any]  # the trainable BatchNormalization layers, in model order
    frozen: list[str]  # names of the layers left alone (trainable=False)
    tensors: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class BnUpdateResult:
    """What `bn_update` did; `output` is None when there was nothing to recalibrate."""

    source: Path
    output: Path | None
    updated: list[str]
    frozen: list[str]
    batches: int
    samples: int
    bytes_written: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": None if self.output is None else str(self.output),
            "updated": self.updated,
            "frozen": self.frozen,
            "batches": self.batches,
            "samples": self.samples,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 6),
        }


def bn_update(
    avg: str | os.PathLike[str],
    data: str | os.PathLike[str] | Dataset | None,
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    batch_size: int = BATCH_SIZE,
    custom_objects: str | None = None,
    trust: bool = False,
) -> BnUpdateResult:
    """Write `out`: `avg` with every trainable BatchNormalization layer's moving mean and
    variance recomputed on `data`'s ``x_train`` (see the module docstring for the definition).

    `out` has `avg`'s format and every byte of `avg` except those statistics; it is written
    atomically. A ``.weights.h5`` `avg` needs `model` (a ``.keras`` or ``.h5`` model) for the
    architecture. With no trainable BatchNormalization layer nothing is written and the
    result's `output` is None. Raises `WavgError` subclasses for every problem.
    """
    started = time.perf_counter()
    avg_path, out_path = Path(avg), Path(out)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    layout_name = _check_paths(avg_path, out_path, model)
    dataset = data if isinstance(data, Dataset) else load_data(data)
    net = load_network(avg_path, model, custom_objects, trust)
    check_inputs_fit(dataset, net.input_shape)
    plan = plan_bn_update(net, avg_path, layout_name)
    result = BnUpdateResult(
        source=avg_path,
        output=None,
        updated=[layer.name for layer in plan.layers],
        frozen=plan.frozen,
        batches=0,
        samples=len(dataset.x_train),
        bytes_written=0,
        seconds=0.0,
    )
    if plan.layers:
        result.batches, result.bytes_written = recalibrate(
            net, plan, avg_path, out_path, dataset.x_train, batch_size, weights_loaded=True
        )
        result.output = out_path
    result.seconds = time.perf_counter() - started
    return result


def load_network(
    avg: Path, model: str | os.PathLike[str] | None, custom_objects: str | None, trust: bool
) -> Any:
    """The model with `avg`'s weights, through wavg's safe loading path."""
    from wavg.workflows.model_loading import load_model, load_weights

    if model is None:
        return load_model(avg, trust=trust, custom_objects=custom_objects, compile=False)
    net = load_model(model, trust=trust, custom_objects=custom_objects, compile=False)
    load_weights(net, avg)
    return net


def recalibrate(
    net: Any,
    plan: BnPlan,
    src: Path,
    out: Path,
    x: np.ndarray,
    batch_size: int = BATCH_SIZE,
    *,
    weights_loaded: bool = False,
) -> tuple[int, int]:
    """Load `src`'s weights into `net` (unless already loaded), recompute the statistics of
    `plan`'s layers on `x` and write `src` with them to `out`; return (batches, bytes)."""
    from wavg.workflows.model_loading import load_weights

    if not weights_loaded:
        load_weights(net, src)
    means, variances, batches = batch_statistics(plan.layers, net, x, batch_size)
    replacements = {}
    for (mean_name, var_name), mean, var in zip(plan.tensors, means, variances, strict=True):
        replacements[mean_name] = mean
        replacements[var_name] = var
    return batches, rewrite_tensors(src, out, replacements)


def bn_layers(net: Any) -> tuple[list[Any], list[Any]]:
    """(trainable, frozen) BatchNormalization layers of `net`, nested models included."""
    from wavg.workflows.model_loading import import_keras

    keras = import_keras()
    # Keras 3 has no public recursive walk; _flatten_layers is what Model.layers builds on.
    layers = list(net._flatten_layers(include_self=False, recursive=True))
    found = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    return [b for b in found if b.trainable], [b for b in found if not b.trainable]


def plan_bn_update(net: Any, like: Path, layout_name: str | None = None) -> BnPlan:
    """Find `net`'s BatchNormalization layers and the names of their statistics in `like`.

    The names come from Keras itself: the statistics are set to distinctive marker values,
    the model is saved in `like`'s format into a private temporary directory, and each
    marker is looked up in that file. `like` must then hold the same tensors (names, shapes)
    as that file, or it was not written the way this Keras writes the model.
    """
    trainable, frozen = bn_layers(net)
    plan = BnPlan(layers=trainable, frozen=[b.name for b in frozen])
    if not trainable:
        return plan
    variables = [v for layer in trainable for v in (layer.moving_mean, layer.moving_variance)]
    saved = [np.array(v.numpy()) for v in variables]
    rng = np.random.default_rng(20260)
    markers = [rng.uniform(1000.0, 2000.0, s.shape).astype(s.dtype) for s in saved]
    with tempfile.TemporaryDirectory(prefix="wavg-bn-") as tmp:
        try:
            for variable, marker in zip(variables, markers, strict=True):
                variable.assign(marker)
            probe = _save_like(net, Path(tmp), layout_name or _layout_name(like))
        finally:
            for variable, value in zip(variables, saved, strict=True):
                variable.assign(value)
        names = _find_markers(probe, markers, like)
    plan.tensors = list(zip(names[0::2], names[1::2], strict=True))
    return plan


def batch_statistics(
    layers: Sequence[Any], net: Any, x: np.ndarray, batch_size: int = BATCH_SIZE
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Per layer, the average over batches of the batch mean and of the batch (biased)
    variance of its inputs, with `layers` in training mode and all others in inference mode.

    Each layer's ``call`` is wrapped for the pass (and restored after): the wrapper records
    the statistics of the inputs it receives and calls the layer with ``training=True``.
    """
    sums = [[0.0, 0.0, 0] for _ in layers]  # sum of batch means, of batch variances, calls
    for i, layer in enumerate(layers):
        layer.call = _recording_call(layer, sums[i])
    batches = 0
    try:
        for start in range(0, len(x), batch_size):
            net(x[start : start + batch_size], training=False)
            batches += 1
    finally:
        for layer in layers:
            del layer.call
    unused = [layer.name for layer, s in zip(layers, sums, strict=True) if s[2] == 0]
    if unused:
        raise UsageError(f"layer {unused[0]} is never called by the model; cannot recalibrate it")
    dtypes = [np.dtype(layer.moving_mean.dtype) for layer in layers]
    # A layer called several times per batch (a shared layer) averages over all its calls.
    means = [(s[0] / s[2]).astype(d) for s, d in zip(sums, dtypes, strict=True)]
    variances = [(s[1] / s[2]).astype(d) for s, d in zip(sums, dtypes, strict=True)]
    return means, variances, batches


def _recording_call(layer: Any, sums: list[Any]) -> Any:
    from wavg.workflows.model_loading import import_keras

    ops = import_keras().ops
    original = layer.call

    def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if mask is not None:
            raise UsageError(
                f"layer {layer.name} receives a mask; bn-update does not support masked inputs"
            )
        values = np.asarray(ops.convert_to_numpy(inputs), dtype=np.float64)
        axes = tuple(i for i in range(values.ndim) if i != layer.axis % values.ndim)
        sums[0] = sums[0] + values.mean(axis=axes)
        sums[1] = sums[1] + values.var(axis=axes)
        sums[2] += 1
        return original(inputs, training=True, mask=mask)

    return call


def _check_paths(avg: Path, out: Path, model: str | os.PathLike[str] | None) -> str:
    """Check `avg` with combine's reader (nothing of it reaches Keras before) and the output
    name; return the layout name."""
    from wavg.storage.atomic import check_output_dir
    from wavg.workflows.model_loading import is_weights_only

    ckpt = open_checkpoint(os.fspath(avg))
    try:
        layout = ckpt.layout
    finally:
        ckpt.close()
    if layout not in _MODEL_LAYOUTS:
        raise CheckpointError(
            avg,
            f"is a {layout.name} file; bn-update reads Keras 3 models (.h5, .keras) and "
            ".weights.h5 files",
        )
    if model is None and is_weights_only(avg):
        raise CheckpointError(
            avg,
            "is a weights-only file and holds no architecture; pass --model FILE.keras "
            "with the model it was saved from",
        )
    if not layout.accepts_output(out.name):
        wanted = " or ".join(layout.suffixes)
        raise UsageError(f"output {out} must end in {wanted} for a {layout.name} input")
    refuse_same_file(Path(avg), out)
    check_output_dir(out)
    return layout.name


def _layout_name(path: Path) -> str:
    ckpt = open_checkpoint(os.fspath(path))
    try:
        return ckpt.layout.name
    finally:
        ckpt.close()


def _save_like(net: Any, directory: Path, layout_name: str) -> Path:
    """Save `net` the way a file of `layout_name` was saved."""
    from wavg.workflows.model_loading import keras_logs_quiet

    suffix = {
        LEGACY_MODEL.name: ".h5",
        KERAS_ARCHIVE.name: ".keras",
        KERAS3_WEIGHTS.name: ".weights.h5",
    }[layout_name]
    path = directory / f"probe{suffix}"
    with keras_logs_quiet():
        if suffix == ".weights.h5":
            net.save_weights(path)
        else:
            net.save(path)
    return path


def _find_markers(probe: Path, markers: list[np.ndarray], like: Path) -> list[str]:
    """The tensor of `probe` holding each marker; `like` must hold the same tensors."""
    found = open_checkpoint(os.fspath(probe))
    target = open_checkpoint(os.fspath(like))
    try:
        names = []
        for marker in markers:
            matches = [
                name
                for name, tensor in found.tensors.items()
                if tensor.averaged
                and tensor.shape == marker.shape
                and np.array_equal(read_tensor(found, name), marker)
            ]
            if len(matches) != 1:
                raise CheckpointError(
                    like, "cannot locate the BatchNormalization statistics in the saved model"
                )
            names.append(matches[0])
        _check_same_tensors(found, target)
    finally:
        found.close()
        target.close()
    return names


def _check_same_tensors(reference: Checkpoint, target: Checkpoint) -> None:
    expected = {n: t.shape for n, t in reference.tensors.items() if t.averaged}
    actual = {n: t.shape for n, t in target.tensors.items() if t.averaged}
    if expected != actual:
        differ = sorted(set(expected.items()) ^ set(actual.items()))
        raise CheckpointError(
            target.path,
            "its tensors are not laid out the way this Keras saves the model (written by "
            f"another Keras version?), e.g. {differ[0][0]}; cannot locate the "
            "BatchNormalization statistics",
        )
