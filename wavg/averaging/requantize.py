"""Keras' int8 and int4 weight quantization, redone in numpy on blocks of rows.

Dequantizes stored kernels to float64 and requantizes an averaged float32 kernel exactly as
Keras 3's ``layer.quantize("int8" | "int4")`` does on the host (``to_numpy=True``): the same
abs-max or min/max scale formula, epsilon, float32 operation order, round-half-even,
clipping, zero points, zero padding of the last group and nibble packing, so the result is
bit-identical to quantizing a float model holding that kernel. Pure numpy on arrays: no file,
no Keras, no state beyond the running per-channel statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from wavg.formats.quantized import Geometry

# keras.config.epsilon() at import, the default of Keras' quantizers.
EPSILON = 1e-07
INT8_RANGE = (-127, 127)
INT4_RANGE = (-8, 7)


def value_range(geo: Geometry) -> tuple[int, int]:
    return INT4_RANGE if geo.mode == "int4" else INT8_RANGE


def unpack_int4(packed: np.ndarray, cols: int) -> np.ndarray:
    """Signed int4 values (int8, rows x cols) from bytes packed along the last axis (low
    nibble first), as ``keras.quantizers.unpack_int4``."""
    raw = packed.view(np.uint8)
    out = np.empty((raw.shape[0], raw.shape[1] * 2), np.uint8)
    out[:, 0::2] = raw & 0x0F
    out[:, 1::2] = raw >> 4
    signed = (out[:, :cols] ^ 8).astype(np.int8) - np.int8(8)
    return signed.astype(np.int8)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Pack int4 values (int8, rows x cols) two to a byte along the last axis, an odd last
    column padded with 0, as ``keras.quantizers.pack_int4(values, axis=-1)``."""
    rows, cols = values.shape
    padded = np.zeros((rows, cols + cols % 2), np.uint8)
    padded[:, :cols] = values.view(np.uint8) & 0x0F
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).view(np.int8)


def dequantize(
    stored: np.ndarray,
    geo: Geometry,
    scale: np.ndarray,
    zero: np.ndarray | None,
    row0: int,
) -> np.ndarray:
    """Float64 values of stored rows ``row0 …`` (flat block of the stored kernel).

    Per channel, value = q / scale (Keras' abs-max scale multiplies); in groups,
    value = (q - zero) * scale. `scale` and `zero` are the layer's whole arrays as stored.
    """
    q = stored.reshape(-1, geo.stored_cols)
    if geo.packed:
        q = unpack_int4(q, geo.cols)
    if geo.block_size is None:
        s = scale.reshape(-1).astype(np.float64)
        per = s[None, :] if geo.axis == 0 else s[row0 : row0 + q.shape[0], None]
        return q.astype(np.float64) / per
    assert zero is not None
    return _grouped(q, geo, scale.astype(np.float64), zero.astype(np.float64), row0, _dequantize)


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return (q.astype(np.float64) - zero) * scale


def _quantize(block: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return np.round(np.divide(block, scale)) + zero


def _grouped(
    block: np.ndarray,
    geo: Geometry,
    scale: np.ndarray,
    zero: np.ndarray,
    row0: int,
    op: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """`op(values, scale, zero)` with each element's group parameters broadcast to it: one
    call per group of rows (axis 0), or with the parameters repeated across each row's
    groups (axis 1). Elementwise, so the result does not depend on how it is cut."""
    rows = block.shape[0]
    size = geo.block_size
    assert size is not None
    if geo.axis == 1:
        lay = slice(row0, row0 + rows)
        wide = (np.repeat(p[lay], size, axis=1)[:, : geo.cols] for p in (scale, zero))
        return op(block, *wide)
    parts = []
    first = row0
    while first < row0 + rows:
        group = first // size
        last = min((group + 1) * size, row0 + rows)
        part = block[first - row0 : last - row0]
        parts.append(op(part, scale[group][None, :], zero[group][None, :]))
        first = last
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class Statistics:
    """The running abs-max (per channel) or min/max (per group) of an averaged kernel,
    fed row block by row block; `finish` turns them into Keras' scale and zero point."""

    def __init__(self, geo: Geometry) -> None:
        self.geo = geo
        if geo.block_size is None:
            channels = geo.cols if geo.axis == 0 else geo.rows
            self.absmax = np.zeros(channels, np.float32)
        else:
            shape = (geo.groups, geo.cols) if geo.axis == 0 else (geo.rows, geo.groups)
            self.low = np.full(shape, np.inf, np.float32)
            self.high = np.full(shape, -np.inf, np.float32)

    def update(self, block: np.ndarray, row0: int) -> None:
        """Fold in float32 rows ``row0 …`` (rows x cols)."""
        geo = self.geo
        rows = block.shape[0]
        if geo.block_size is None:
            if geo.axis == 0:
                np.maximum(self.absmax, np.max(np.abs(block), axis=0), out=self.absmax)
            else:
                self.absmax[row0 : row0 + rows] = np.max(np.abs(block), axis=1)
            return
        size = geo.block_size
        if geo.axis == 0:
            first = row0
            while first < row0 + rows:
                group = first // size
                last = min((group + 1) * size, row0 + rows)
                part = block[first - row0 : last - row0]
                np.minimum(self.low[group], part.min(axis=0), out=self.low[group])
                np.maximum(self.high[group], part.max(axis=0), out=self.high[group])
                first = last
            return
        padded = np.zeros((rows, geo.groups * size), np.float32)
        padded[:, : geo.cols] = block
        grouped = padded.reshape(rows, geo.groups, size)
        self.low[row0 : row0 + rows] = grouped.min(axis=2)
        self.high[row0 : row0 + rows] = grouped.max(axis=2)

    def finish(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(scale float32, zero point float32 for quantizing, zero point int8 as stored).

        The expressions mirror ``abs_max_quantize`` and
        ``_abs_max_quantize_grouped_with_zero_point_numpy`` operation for operation, in
        float32 (Python scalars are weak under numpy 2, as in Keras' own call).
        """
        geo = self.geo
        qmin, qmax = value_range(geo)
        if geo.block_size is None:
            return np.divide(qmax, np.add(self.absmax, EPSILON)), None, None
        low, high = self.low, self.high
        if geo.reduced % geo.block_size:  # Keras pads the last group with zeros
            last = (-1, slice(None)) if geo.axis == 0 else (slice(None), -1)
            low[last] = np.minimum(low[last], np.float32(0))
            high[last] = np.maximum(high[last], np.float32(0))
        scale = np.divide(np.subtract(high, low) + EPSILON, qmax - qmin)
        zero = np.round(np.divide(-low, scale)) + qmin
        zero = np.clip(zero, qmin, qmax)
        return scale, zero, zero.astype(np.int8)


def quantize(
    block: np.ndarray, geo: Geometry, scale: np.ndarray, zero: np.ndarray | None, row0: int
) -> np.ndarray:
    """The stored (int8, packed for int4) rows of float32 rows ``row0 …``, flat."""
    qmin, qmax = value_range(geo)
    rows = block.shape[0]
    if geo.block_size is None:
        per = scale[None, :] if geo.axis == 0 else scale[row0 : row0 + rows, None]
        values = np.clip(np.round(np.multiply(block, per)), qmin, qmax).astype(np.int8)
    else:
        assert zero is not None
        shifted = _grouped(block, geo, scale, zero, row0, _quantize)
        values = np.clip(shifted, qmin, qmax).astype(np.int8)
    if geo.packed:
        values = pack_int4(values)
    return values.reshape(-1)
