"""The numpy oracle for averages of real checkpoints: read back with plain h5py, summed in
float64, rounded once to each tensor's dtype; never through wavg's own readers."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"


def reference_average(weights: list[list[np.ndarray]], w: np.ndarray) -> list[np.ndarray]:
    """numpy.average over the checkpoints, tensor by tensor, in each tensor's own dtype."""
    result = []
    for tensors in zip(*weights, strict=True):
        stacked = np.stack([t.astype(np.float64) for t in tensors])
        result.append(np.average(stacked, axis=0, weights=w).astype(tensors[0].dtype))
    return result


def assert_exact_average(got: np.ndarray, members: list[np.ndarray], weights) -> None:
    """`got` is the weighted mean of `members`, rounded once to their dtype.

    It must match numpy.average (rtol 1e-6, the contract), and each element must be the
    true mean correctly rounded (within half a unit in the last place, with a hair of slack
    for a true mean that sits on a rounding tie) or no farther from it than numpy.average.
    Pass the raw weights wavg sums with (`wavg.averaging.schemes.raw_weights`) so that the true mean
    (taken in extended precision) is the one wavg computes.
    """
    dtype = members[0].dtype
    stack = np.stack([m.astype(np.float64) for m in members])
    w = np.asarray(weights, dtype=np.float64)
    numpy_average = np.average(stack, axis=0, weights=w)
    assert got.dtype == dtype and got.shape == members[0].shape
    rtol = max(1e-6, float(ml_dtypes.finfo(dtype).eps))  # one rounding to a 16-bit float
    np.testing.assert_allclose(got.astype(np.float64), numpy_average, rtol=rtol, atol=1e-30)
    wide = stack.astype(np.longdouble)
    w_wide = w.astype(np.longdouble).reshape(-1, *[1] * (stack.ndim - 1))
    exact = (wide * w_wide).sum(axis=0) / w_wide.sum()
    ours = np.abs(got.astype(np.float64).astype(np.longdouble) - exact)
    numpys = np.abs(numpy_average.astype(dtype).astype(np.float64).astype(np.longdouble) - exact)
    _, exponent = np.frexp(exact.astype(np.float64))
    half_ulp = np.ldexp(float(ml_dtypes.finfo(dtype).eps), exponent - 2).astype(np.longdouble)
    ok = (ours <= numpys) | (ours <= half_ulp * (1 + 2.0**-10))
    assert ok.all(), f"not the correctly rounded mean at {np.argwhere(~ok)[:5].tolist()}"


def h5_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file (or of a .keras archive's weights) by name."""
    import io
    import zipfile

    import h5py

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            source = io.BytesIO(archive.read("model.weights.h5"))
        f = h5py.File(source, "r")
    else:
        f = h5py.File(path, "r")
    found: dict[str, np.ndarray] = {}
    with f:
        f.visititems(
            lambda n, o: found.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
        )
    return found
