"""Recognise quantized layers in a checkpoint, from its stored config and its tensor layout.

Keras' ``model.quantize`` replaces a layer's float kernel by integers plus scales (int8,
int4 packed two to a byte, data-calibrated GPTQ/AWQ) or adds float8 scaling state; averaging
such tensors element by element gives a model that is no average of anything. This module
finds those layers and says how each maps integers to floats (its `Geometry`), working only
from the format-agnostic `Checkpoint` (tensor names, shapes, dtypes, `model_config()`); it
never reads a weight value except a small ``g_idx`` when no config records the block size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from wavg.errors import CheckpointError
from wavg.formats.base import Checkpoint, Tensor

HINT = (
    "average the float checkpoints, then quantize the average "
    "(wavg combine, then model.quantize(...))"
)
REQUANTIZABLE = ("int8", "int4")
_MODE = re.compile(r"^(int8|int4|float8|gptq|awq)(?:/(-?\d+))?")
_KERNEL_NAMES = ("kernel", "embeddings", "quantized_kernel")


class QuantizedCheckpoint(CheckpointError):
    """A checkpoint holds quantized layers, which plain averaging would corrupt."""


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized layer's tensors in a checkpoint, and what the config says of it."""

    group: str  # the variable group holding the layer's tensors
    mode: str  # int8, int4, float8, gptq, awq
    kernel: Tensor  # the integer kernel (float8 and uncalibrated modes: the first tensor)
    scale: Tensor | None
    zero: Tensor | None  # int4 sub-channel zero points
    g_idx: Tensor | None  # int4 sub-channel group index of each reduced row
    layer_class: str | None  # Dense, EinsumDense, Embedding ... when the config or names say
    block_size: int | None  # int4 group size from the config (-1: per channel)
    equation: str | None  # EinsumDense
    output_dim: int | None  # Embedding

    @property
    def example(self) -> str:
        """The tensor to name in a message."""
        return self.kernel.name


@dataclass(frozen=True)
class Geometry:
    """How a quantized kernel maps to a 2-D float matrix, as Keras' quantizer sees it.

    The float kernel, flattened to ``rows x cols`` (C order), is quantized along `axis`
    (0: one scale per column, as Dense; 1: one per row, as Embedding), per channel or in
    groups of `block_size` along that axis. int4 values are stored packed two to a byte
    along the last axis, so the stored kernel is ``rows x ceil(cols / 2)``.
    """

    mode: str
    rows: int
    cols: int
    axis: int
    block_size: int | None  # None: per channel

    @property
    def packed(self) -> bool:
        return self.mode == "int4"

    @property
    def stored_cols(self) -> int:
        return (self.cols + 1) // 2 if self.packed else self.cols

    @property
    def reduced(self) -> int:
        return self.rows if self.axis == 0 else self.cols

    @property
    def groups(self) -> int:
        return 1 if self.block_size is None else math.ceil(self.reduced / self.block_size)


def find_quantized(ckpt: Checkpoint, always_config: bool = True) -> list[QuantizedLayer]:
    """Every quantized layer of `ckpt`, in file order; [] for a plain float checkpoint.

    A layer counts as quantized when the config gives it a quantized dtype policy
    (``int8``, ``int4/128``, ``float8``, ``gptq/...``) or its variable group holds an 8-bit
    integer matrix beside float tensors (a kernel with its scales), or float8's scale and
    amax-history pattern. A config that claims quantization for a layer whose tensors do not
    fit raises `CheckpointError` naming the tensor. Without `always_config` the config is
    read only when the layout shows quantized layers (reading it costs a reopen per input).
    """
    groups = list(_groups(ckpt))
    suspect = any(_mode_from_layout(tensors, _named(tensors)) for _, tensors in groups)
    config_layers = _config_layers(ckpt) if always_config or suspect else {}
    if not suspect and not any(facts.get("mode") for facts in config_layers.values()):
        return []  # what `_classify` would find: neither the layout nor the config says so
    found = []
    for group, tensors in groups:
        info = _match_config(group, config_layers)
        layer = _classify(ckpt, group, tensors, info)
        if layer is not None:
            found.append(layer)
    return found


def refuse_quantized(ckpt: Checkpoint, layers: list[QuantizedLayer] | None = None) -> None:
    """Raise `QuantizedCheckpoint` if `ckpt` holds quantized layers (the default policy)."""
    layers = find_quantized(ckpt) if layers is None else layers
    if layers:
        first = layers[0]
        raise QuantizedCheckpoint(
            ckpt.path,
            f"tensor {first.example} is {first.mode}-quantized; averaging quantized weights "
            f"gives a model that is no average of the run: {HINT}",
        )


def geometry(ckpt: Checkpoint, layer: QuantizedLayer) -> Geometry:
    """How `layer`'s kernel maps to floats; raises `QuantizedCheckpoint` when it cannot be
    requantized (a data-calibrated or float8 mode, a non-float32 scale, or a layout that the
    file alone does not pin down) and `CheckpointError` when its tensors do not fit."""
    path = ckpt.path
    if layer.mode not in REQUANTIZABLE:
        why = (
            "its scales and amax history are training state, not weights"
            if layer.mode == "float8"
            else "requantizing it needs calibration data"
        )
        raise QuantizedCheckpoint(
            path, f"tensor {layer.example} is {layer.mode}-quantized and {why}: {HINT}"
        )
    kernel, scale = layer.kernel, layer.scale
    assert kernel is not None and scale is not None  # _classify guarantees both
    if scale.dtype != np.float32:
        raise QuantizedCheckpoint(
            path,
            f"tensor {scale.name} is a {scale.dtype} scale; --quantized requantize handles "
            f"float32 scales only: {HINT}",
        )
    preferred = _preferred_axis(layer, path)
    candidates = _candidates(layer)
    if not candidates and _permuted_channels(layer):
        raise QuantizedCheckpoint(
            path,
            f"tensor {scale.name} {scale.shape} orders the channels of kernel {kernel.name} "
            f"{kernel.shape} differently (an EinsumDense that reorders axes), which "
            f"--quantized requantize does not lay out: {HINT}",
        )
    if not candidates:
        raise CheckpointError(
            path,
            f"tensor {scale.name} has shape {scale.shape}, which fits no {layer.mode} "
            f"quantization of kernel {kernel.name} {kernel.shape}",
        )
    if preferred is not None:
        candidates = [g for g in candidates if g.axis == preferred] or candidates
    if len(candidates) > 1:
        raise QuantizedCheckpoint(
            path,
            f"the file alone does not say how kernel {kernel.name} {kernel.shape} was "
            f"quantized (several layouts fit); save the checkpoints as .keras: {HINT}",
        )
    found = candidates[0]
    if layer.zero is None and layer.mode == "int4" and (layer.block_size or -1) > 0:
        raise CheckpointError(
            path,
            f"its config quantizes kernel {kernel.name} in int4 groups of {layer.block_size}, "
            "but the layer has no zero-point tensor",
        )
    if layer.zero is not None:
        found = _with_block_size(ckpt, layer, found)
    return found


def _with_block_size(ckpt: Checkpoint, layer: QuantizedLayer, found: Geometry) -> Geometry:
    """Pin the int4 group size: from the config, else from ``g_idx`` (floor(i / size))."""
    size = layer.block_size if layer.block_size and layer.block_size > 0 else None
    groups = layer.scale.shape[0] if found.axis == 0 else layer.scale.shape[1]  # type: ignore[union-attr]
    if size is None and layer.g_idx is not None and groups > 1:
        values = read_all(ckpt, layer.g_idx)
        size = int(np.count_nonzero(values == 0))
        expected = np.floor_divide(np.arange(values.size, dtype=np.float32), size)
        if size < 1 or not np.array_equal(values, expected):
            raise CheckpointError(
                ckpt.path, f"tensor {layer.g_idx.name} is not a valid int4 group index"
            )
    if size is None:
        raise QuantizedCheckpoint(
            ckpt.path,
            f"the int4 group size of kernel {layer.example} is not recorded (no model config "
            f"and a single group); save the checkpoints as .keras: {HINT}",
        )
    if math.ceil(found.reduced / size) != groups:
        raise CheckpointError(
            ckpt.path,
            f"tensor {layer.scale.name} has {groups} group(s), but int4 groups of {size} "  # type: ignore[union-attr]
            f"over {found.reduced} rows make {math.ceil(found.reduced / size)}",
        )
    return Geometry(found.mode, found.rows, found.cols, found.axis, size)


def read_all(ckpt: Checkpoint, tensor: Tensor) -> np.ndarray:
    """A small tensor's values, whole (scales, zero points, g_idx)."""
    scratch = np.empty(max(tensor.nbytes, 1), np.uint8)
    return ckpt.read(tensor, 0, tensor.size, (), scratch).copy()


def _candidates(layer: QuantizedLayer) -> list[Geometry]:
    """Every geometry consistent with the kernel's, scale's and zero point's shapes."""
    kshape = layer.kernel.shape  # type: ignore[union-attr]
    sshape = layer.scale.shape  # type: ignore[union-attr]
    found: dict[tuple[int, int, int], Geometry] = {}
    if layer.mode == "int8":
        for k in range(1, len(kshape)):
            lead, trail = math.prod(kshape[:k]), math.prod(kshape[k:])
            if _squeezed(sshape) == _squeezed(kshape[k:]):
                found[(lead, trail, 0)] = Geometry("int8", lead, trail, 0, None)
            if _squeezed(sshape) == _squeezed(kshape[:k]):
                found[(lead, trail, 1)] = Geometry("int8", lead, trail, 1, None)
        return list(found.values())
    if len(kshape) != 2:
        return []
    rows, stored = kshape
    if layer.zero is None:  # per channel
        channels = _squeezed(sshape)
        if len(channels) == 1 and (channels[0] + 1) // 2 == stored:
            found[(rows, channels[0], 0)] = Geometry("int4", rows, channels[0], 0, None)
        if channels == (rows,) or (rows == 1 and channels == ()):
            cols = layer.output_dim
            if cols is not None and (cols + 1) // 2 == stored:
                found[(rows, cols, 1)] = Geometry("int4", rows, cols, 1, None)
            elif cols is None:  # the unpacked width is only in the config: both fit
                for width in (2 * stored - 1, 2 * stored):
                    found[(rows, width, 1)] = Geometry("int4", rows, width, 1, None)
        return list(found.values())
    if layer.zero.shape != sshape or len(sshape) != 2:
        return []
    g_len = layer.g_idx.shape[0] if layer.g_idx is not None and layer.g_idx.shape else None
    groups, width = sshape
    if (width + 1) // 2 == stored and g_len in (None, rows):
        found[(rows, width, 0)] = Geometry("int4", rows, width, 0, -1)
    if groups == rows and g_len is not None and (g_len + 1) // 2 == stored:
        found[(rows, g_len, 1)] = Geometry("int4", rows, g_len, 1, -1)
    return list(found.values())


def _permuted_channels(layer: QuantizedLayer) -> bool:
    """An int8 scale holding the kernel's kept axes in another order (EinsumDense)."""
    kshape, sshape = layer.kernel.shape, layer.scale.shape  # type: ignore[union-attr]
    if layer.mode != "int8":
        return False
    wanted = sorted(_squeezed(sshape))
    return any(
        wanted == sorted(_squeezed(kshape[k:])) or wanted == sorted(_squeezed(kshape[:k]))
        for k in range(1, len(kshape))
    )


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def _preferred_axis(layer: QuantizedLayer, path: str) -> int | None:
    """The reduced axis the layer's class implies (Dense 0, Embedding 1, EinsumDense by its
    equation), or None when unknown."""
    if layer.layer_class == "Dense":
        return 0
    if layer.layer_class == "Embedding":
        return 1
    if layer.layer_class == "EinsumDense" and layer.equation and layer.mode == "int4":
        return 0
    if layer.layer_class == "EinsumDense" and layer.equation:
        return _einsum_axis(layer, path)
    return None


def _einsum_axis(layer: QuantizedLayer, path: str) -> int | None:
    """0 or 1 when the equation reduces the kernel's leading or trailing axes and keeps the
    others in their own order (then the stored scale is in channel order); else refuse."""
    spec = (layer.equation or "").replace("...", "")
    match = re.fullmatch(r"([a-zA-Z]*),([a-zA-Z]+)->([a-zA-Z]*)", spec)
    if match is None:
        return None
    kernel_spec, output = match.group(2), match.group(3)
    reduced = [i for i, label in enumerate(kernel_spec) if label not in output]
    kept = [label for label in kernel_spec if label in output]
    in_output_order = sorted(kept, key=output.index)
    n = len(kernel_spec)
    if reduced and kept == in_output_order:
        if reduced == list(range(len(reduced))):
            return 0
        if reduced == list(range(n - len(reduced), n)):
            return 1
    raise QuantizedCheckpoint(
        path,
        f"tensor {layer.example} belongs to an EinsumDense ({layer.equation!r}) whose scale "
        f"--quantized requantize cannot lay out: {HINT}",
    )


# ---------------------------------------------------------------------------------------------
# grouping tensors into layers


def _groups(ckpt: Checkpoint) -> Iterator[tuple[str, list[Tensor]]]:
    """Model-weight tensors grouped by their parent path; Keras 3's numbered ``vars/N`` in
    their numeric (variable) order, named legacy datasets in file order."""
    groups: dict[str, list[Tensor]] = {}
    for tensor in ckpt.tensors.values():
        if ckpt.layout.is_optimizer(tensor.name) or "/" not in tensor.name:
            continue
        groups.setdefault(tensor.name.rsplit("/", 1)[0], []).append(tensor)
    for group, tensors in groups.items():
        leaves = [t.name.rsplit("/", 1)[1] for t in tensors]
        if all(leaf.isdigit() for leaf in leaves):
            tensors = sorted(tensors, key=lambda t: int(t.name.rsplit("/", 1)[1]))
        yield group, tensors


def _named(tensors: list[Tensor]) -> bool:
    """Legacy .h5 names its datasets (kernel, kernel_scale); Keras 3 numbers them."""
    return not all(_leaf(t).isdigit() for t in tensors)


def _leaf(tensor: Tensor) -> str:
    return tensor.name.rsplit("/", 1)[1]


def _is_int8(t: Tensor) -> bool:
    return t.storage in (np.dtype(np.int8), np.dtype(np.uint8))


def _is_float(t: Tensor) -> bool:
    return t.averaged or t.dtype.kind == "f"


def _classify(
    ckpt: Checkpoint, group: str, tensors: list[Tensor], info: dict[str, Any] | None
) -> QuantizedLayer | None:
    mode = info.get("mode") if info else None
    named = _named(tensors)
    if mode is None:
        mode = _mode_from_layout(tensors, named)
        if mode is None:
            return None
    common = {
        "group": group,
        "mode": mode,
        "layer_class": (info or {}).get("class_name") or _class_from_names(group, tensors),
        "block_size": (info or {}).get("block_size"),
        "equation": (info or {}).get("equation"),
        "output_dim": (info or {}).get("output_dim"),
    }
    if mode == "float8":
        return QuantizedLayer(kernel=tensors[0], scale=None, zero=None, g_idx=None, **common)
    ints = [t for t in tensors if _is_int8(t) and len(t.shape) >= 2]
    if not ints:
        if mode in REQUANTIZABLE:
            first = tensors[0]
            raise CheckpointError(
                ckpt.path,
                f"its config says layer {group} is {mode}-quantized, but tensor {first.name} "
                f"is {first.storage}, not an 8-bit integer kernel",
            )
        return QuantizedLayer(kernel=tensors[0], scale=None, zero=None, g_idx=None, **common)
    kernel, scale, zero, g_idx = _roles(tensors, ints, named)
    if scale is None and mode in REQUANTIZABLE:
        raise CheckpointError(
            ckpt.path,
            f"tensor {kernel.name} is a {mode}-quantized kernel without its scale tensor",
        )
    return QuantizedLayer(kernel=kernel, scale=scale, zero=zero, g_idx=g_idx, **common)


def _mode_from_layout(tensors: list[Tensor], named: bool) -> str | None:
    leaves = [_leaf(t) for t in tensors]
    if any(leaf.endswith("_amax_history") for leaf in leaves):
        return "float8"
    ints = [t for t in tensors if _is_int8(t) and len(t.shape) >= 2]
    floats = [t for t in tensors if _is_float(t)]
    if ints and floats:
        if ints[0].storage == np.dtype(np.uint8) or "quantized_kernel" in leaves:
            return "gptq"
        if len(ints) > 1 or any(leaf.endswith("_zero") or leaf == "g_idx" for leaf in leaves):
            return "int4"
        return "int8"
    if not named and _looks_float8(tensors):
        return "float8"
    return None


def _looks_float8(tensors: list[Tensor]) -> bool:
    """Keras 3's float8 variables: kernel, [bias], then three (scalar scale, amax history)
    pairs, all float."""
    tail = tensors[-6:]
    if len(tensors) < 7 or not all(_is_float(t) for t in tensors):
        return False
    scalars, histories = tail[0::2], tail[1::2]
    lengths = {t.shape for t in histories}
    return all(t.shape == () for t in scalars) and len(lengths) == 1 and len(lengths.pop()) == 1


def _roles(
    tensors: list[Tensor], ints: list[Tensor], named: bool
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Kernel, scale, zero point and g_idx, by name (legacy .h5) or by Keras' variable order
    (kernel, [bias], scale, [zero, g_idx])."""
    if named:
        by_leaf = {_leaf(t): t for t in tensors}
        kernel = next((by_leaf[n] for n in _KERNEL_NAMES if n in by_leaf), ints[0])
        scale = next((t for t in tensors if _leaf(t).endswith("_scale") and _is_float(t)), None)
        zero = next((t for t in tensors if _leaf(t).endswith(("_zero", "zero_point"))), None)
        return kernel, scale, zero, by_leaf.get("g_idx")
    kernel = ints[0]
    after = tensors[tensors.index(kernel) + 1 :]
    zero = next((t for t in after if _is_int8(t)), None)
    if zero is not None:
        at = after.index(zero)
        scale = after[at - 1] if at >= 1 and _is_float(after[at - 1]) else None
        rest = after[at + 1 :]
        g_idx = rest[0] if rest and _is_float(rest[0]) else None
        return kernel, scale, zero, g_idx
    scale = after[-1] if after and _is_float(after[-1]) else None
    return kernel, scale, None, None


def _class_from_names(group: str, tensors: list[Tensor]) -> str | None:
    """Legacy .h5 names its datasets; Keras 3 names a functional model's groups after the
    layer class (``layers/einsum_dense_2/vars``)."""
    leaves = {_leaf(t) for t in tensors}
    if "embeddings" in leaves:
        return "Embedding"
    if "kernel" in leaves:
        return None  # Dense or EinsumDense
    parts = group.split("/")
    if len(parts) >= 2 and parts[-1] == "vars":
        base = re.sub(r"_\d+$", "", parts[-2])
        return {"dense": "Dense", "embedding": "Embedding", "einsum_dense": "EinsumDense"}.get(base)
    return None


# ---------------------------------------------------------------------------------------------
# the config


def _config_layers(ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    """Quantization facts of each configured layer, keyed by the group names the format
    uses for it (legacy: the layer name; Keras 3: ``layers/<class>[_k]/vars``)."""
    config = ckpt.model_config()
    if not isinstance(config, dict):
        return {}
    if isinstance(config.get("model_config"), dict):
        config = config["model_config"]
    found: dict[str, dict[str, Any]] = {}
    layers = (
        config.get("config", {}).get("layers") if isinstance(config.get("config"), dict) else None
    )
    counters: dict[str, int] = {}
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, dict) or not isinstance(layer.get("config"), dict):
            continue
        facts = _layer_facts(layer)
        snake = _snake(str(layer.get("class_name", "")))
        index = counters.get(snake, -1) + 1
        counters[snake] = index
        key = f"layers/{snake}" + (f"_{index}" if index else "") + "/vars"
        found[key] = facts
        name = layer["config"].get("name")
        if isinstance(name, str):
            found[f"model_weights/{name}"] = facts
    # Layers nested deeper (sub-models) are matched by their mode alone.
    for node in config_dicts(config):
        cfg = node.get("config")
        if isinstance(cfg, dict) and isinstance(cfg.get("name"), str) and "dtype" in cfg:
            facts = _layer_facts(node)
            if facts.get("mode"):
                found.setdefault(f"name:{cfg['name']}", facts)
    return found


def _match_config(group: str, layers: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if group in layers:
        return layers[group]
    parts = group.split("/")
    if parts[0] == "model_weights" and len(parts) >= 2:
        return layers.get(f"model_weights/{parts[1]}") or layers.get(f"name:{parts[-1]}")
    if len(parts) >= 2 and parts[-1] == "vars":
        return None
    return layers.get(f"name:{parts[-1]}")


def _layer_facts(layer: dict[str, Any]) -> dict[str, Any]:
    cfg = layer["config"]
    mode, block = _policy_mode(cfg.get("dtype"))
    facts: dict[str, Any] = {"class_name": layer.get("class_name"), "mode": mode}
    if block is not None:
        facts["block_size"] = block
    if isinstance(cfg.get("equation"), str):
        facts["equation"] = cfg["equation"]
    if isinstance(cfg.get("output_dim"), int):
        facts["output_dim"] = cfg["output_dim"]
    return facts


def _policy_mode(policy: Any) -> tuple[str | None, int | None]:
    """("int4", 128) for an ``Int4DTypePolicy`` of mode ``int4/128`` or ``"int4/128_from_float32"``."""
    text = None
    if isinstance(policy, str):
        text = policy
    elif isinstance(policy, dict):
        cfg = policy.get("config")
        if isinstance(cfg, dict):
            text = cfg.get("mode") if isinstance(cfg.get("mode"), str) else cfg.get("name")
    if not isinstance(text, str):
        return None, None
    match = _MODE.match(text)
    if match is None:
        return None, None
    block = int(match.group(2)) if match.group(1) == "int4" and match.group(2) else None
    return match.group(1), block


def _snake(name: str) -> str:
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def config_dicts(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict nested anywhere in a parsed JSON config, without recursion (a deep,
    hostile config must not exhaust the stack)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
