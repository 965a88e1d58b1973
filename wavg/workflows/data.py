"""Data sets for `train-save` and `evaluate`: the case-study blobs, or the user's ``.npz``.

A data set is four arrays: ``x_train, y_train, x_test, y_test``. A user file is read with
``allow_pickle=False`` (an ``.npz`` holding object arrays could otherwise run code) and checked
before any training, so a wrong file ends in one line that names it and the problem.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wavg.errors import WavgError

BLOBS = "blobs"
DIGITS = "digits"
BUILT_IN = (BLOBS, DIGITS)
ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_CASE_STUDY_TRAIN = 100  # the first 100 of 1100 samples train; the other 1000 test
_BLOBS_ARGS = {"n_samples": 1100, "centers": 3, "n_features": 2, "cluster_std": 2}
_BLOBS_SEED = 2
VALIDATION_SAMPLES = 1000
_VALIDATION_SEED = 20221  # any seed but the case study's; fixed so the split never moves


class DataError(WavgError):
    """A data file is missing, unreadable, incomplete or does not fit the model."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays, plus a name for reports (``blobs`` or the file path)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def blobs() -> Dataset:
    """The case study: 1100 noisy 2-D points in 3 classes, one-hot labels, 100 train, 1000 test.

    Deterministic (``random_state=2``), so every run of the case study sees the same split.
    """
    from sklearn.datasets import make_blobs

    x, labels = make_blobs(**_BLOBS_ARGS, random_state=_BLOBS_SEED)
    x = x.astype(np.float32)
    y = np.eye(3, dtype=np.float32)[labels]
    n = _CASE_STUDY_TRAIN
    return Dataset(BLOBS, x[:n], y[:n], x[n:], y[n:])


def blobs_validation() -> Dataset:
    """A held-out validation set for the case study, disjoint from its 1000 test points.

    1000 fresh points drawn from the same three Gaussians (the case study's centers, standard
    deviation 2) with another fixed seed, so choosing on them (``wavg soup``) never looks at
    the test points ``evaluate`` reports. Its test arrays are the validation points; its
    train arrays are the case study's 100 training points (for ``--bn-data``).
    """
    from sklearn.datasets import make_blobs

    args = dict(_BLOBS_ARGS, n_samples=VALIDATION_SAMPLES)
    _, _, centers = make_blobs(**_BLOBS_ARGS, random_state=_BLOBS_SEED, return_centers=True)
    args["centers"] = centers
    x, labels = make_blobs(**args, random_state=_VALIDATION_SEED)
    train = blobs()
    y = np.eye(3, dtype=np.float32)[labels]
    return Dataset(f"{BLOBS} (validation)", train.x_train, train.y_train, x.astype(np.float32), y)


def load_validation(spec: str | os.PathLike[str] | None = None) -> Dataset:
    """The held-out data a soup is chosen on: ``"blobs"`` and ``"digits"`` give their
    validation splits; a file's ``x_test, y_test`` are its held-out split (it must not be the
    file evaluate reports on)."""
    if spec is None or os.fspath(spec) == BLOBS:
        return blobs_validation()
    if os.fspath(spec) == DIGITS:
        return digits(validation=True)
    return load_npz(spec)


def same_data_file(a: str | os.PathLike[str] | None, b: str | os.PathLike[str] | None) -> bool:
    """Whether two data specs name the same file (built-in data never counts: its splits are
    disjoint by construction)."""
    if a is None or b is None or {os.fspath(a), os.fspath(b)} & set(BUILT_IN):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def digits(validation: bool = False) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), pixels scaled to [0, 1].

    Fixed split in file order: 1000 train, 397 validation (``validation=True`` puts them in
    the test arrays, for ``wavg soup``), 400 test.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images[..., None] / 16.0).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[bunch.target]
    held = slice(1000, 1397) if validation else slice(1397, None)
    name = f"{DIGITS} (validation)" if validation else DIGITS
    return Dataset(name, x[:1000], y[:1000], x[held], y[held])


def load_data(spec: str | os.PathLike[str] | None = None) -> Dataset:
    """``None`` or ``"blobs"`` gives the case study, ``"digits"`` scikit-learn's digits;
    anything else is read as an ``.npz`` file."""
    if spec is None or os.fspath(spec) == BLOBS:
        return blobs()
    if os.fspath(spec) == DIGITS:
        return digits()
    return load_npz(spec)


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Read and validate an ``.npz`` with arrays ``x_train, y_train, x_test, y_test``.

    Raises `DataError` when the file is missing or not an npz, an array is absent or not
    numeric, a split's x and y differ in length or are empty, or train and test disagree on
    the shape of one sample.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such data file" if not path.exists() else "not a file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in ARRAYS if name not in npz.files]
            if missing:
                raise DataError(
                    path, f"missing array(s) {', '.join(missing)}; need {', '.join(ARRAYS)}"
                )
            arrays = {name: npz[name] for name in ARRAYS}
    except DataError:
        raise
    except ValueError as exc:
        # numpy refuses object arrays without allow_pickle with a ValueError.
        raise DataError(
            path, f"cannot read the arrays without pickle ({_first_line(exc)})"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(path, f"not a readable .npz file ({_first_line(exc)})") from None
    _check_arrays(path, arrays)
    return Dataset(str(path), **{name: _as_float(arrays[name]) for name in ARRAYS})


def check_fits_model(data: Dataset, input_shape: object, output_shape: object) -> None:
    """Check that one sample of x fits the model's input and one of y its output.

    Shapes are Keras shapes with ``None`` for the batch (and any free) dimension. Integer
    class labels (y of one dimension) are accepted for any output, as sparse losses use them.
    """
    _check_shape(data, "x", data.x_test.shape[1:], input_shape, "input")
    if data.y_test.ndim > 1:
        _check_shape(data, "y", data.y_test.shape[1:], output_shape, "output")


def check_inputs_fit(data: Dataset, input_shape: object) -> None:
    """Check that one training sample of x fits the model's input (for passes over x_train)."""
    _check_shape(data, "x_train", data.x_train.shape[1:], input_shape, "input")


def _check_shape(
    data: Dataset, which: str, sample: tuple[int, ...], model_shape: object, role: str
) -> None:
    if not isinstance(model_shape, tuple):
        return  # several inputs or outputs: leave the check to Keras
    expected = model_shape[1:]
    fits = len(expected) == len(sample) and all(
        e is None or e == s for e, s in zip(expected, sample, strict=True)
    )
    if not fits:
        shown = tuple("?" if e is None else e for e in expected)
        raise DataError(
            data.name,
            f"{which} samples have shape {sample} but the model's {role} expects {shown}",
        )


def _check_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise DataError(path, f"array {name} is not numeric (dtype {array.dtype})")
        if array.ndim == 0:
            raise DataError(path, f"array {name} is a scalar; need one row per sample")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) == 0:
            raise DataError(path, f"x_{split} is empty")
        if len(x) != len(y):
            raise DataError(path, f"x_{split} has {len(x)} samples but y_{split} has {len(y)}")
    for which in ("x", "y"):
        train, test = arrays[f"{which}_train"].shape[1:], arrays[f"{which}_test"].shape[1:]
        if train != test:
            raise DataError(
                path, f"{which}_train samples have shape {train} but {which}_test ones {test}"
            )


def _as_float(array: np.ndarray) -> np.ndarray:
    # Integer labels stay integers (sparse losses want them); features become float32.
    return array if np.issubdtype(array.dtype, np.integer) else array.astype(np.float32)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
