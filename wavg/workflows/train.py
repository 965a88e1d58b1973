"""`wavg train-save`: train one run and keep the models of its last K epochs.

The default run is the case study: an MLP (Dense 25 relu -> Dense 3 softmax) on the blobs
data, Adam, 500 epochs, batch size 32 as in the tutorial, keeping ``model_490.h5`` ...
``model_499.h5``. Training is a single ``fit`` call with `wavg.keras.KeepLastEpochs`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wavg.errors import OutputError, UsageError
from wavg.workflows.data import DIGITS, Dataset, check_fits_model, load_data
from wavg.workflows.model_loading import import_keras, keras_logs_quiet, load_model

OPTIMIZERS = ("adam", "sgd")
FORMATS = ("h5", "keras", "weights.h5")
BATCH_SIZE = 32  # Keras' default, which the tutorial used

EpochCallback = Callable[[int, int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What a run produced: the kept files (oldest first) and the final epoch's metrics."""

    files: list[Path]
    epochs: int
    seed: int | None
    data: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def train_save(
    out_dir: str | os.PathLike[str] = "checkpoints",
    *,
    epochs: int = 500,
    keep: int = 10,
    optimizer: str | None = None,
    seed: int | None = None,
    fmt: str = "h5",
    data: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    custom_objects: str | None = None,
    trust: bool = False,
    batch_size: int = BATCH_SIZE,
    learning_rate: float | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train for `epochs` and save the model after each of the last `keep` into `out_dir`.

    `optimizer` is ``adam`` (default) or ``sgd`` (lr 0.01, momentum 0.9) for the built-in MLP;
    `learning_rate` replaces the built-in optimizer's constant rate (Adam 0.001, SGD 0.01);
    a `model` file (a compiled ``.keras``/``.h5``, loaded with the safety checks of
    `wavg.workflows.model_loading`) trains with the optimizer it was compiled with. The same `seed` gives
    bit-identical checkpoints on one machine and backend (see `make_deterministic`).
    `on_epoch(done, total, logs)` is called after every epoch, for progress display.
    """
    _check_options(epochs, keep, optimizer, fmt, model, batch_size, learning_rate)
    out = _prepare_out_dir(out_dir)
    dataset = load_data(data)
    keras = import_keras()
    from wavg.workflows.callbacks import KeepLastEpochs, ReportEpochs

    if seed is not None:
        make_deterministic(keras, seed)
    net = _model(keras, dataset, optimizer, model, custom_objects, trust, learning_rate)
    check_fits_model(dataset, net.input_shape, net.output_shape)
    keeper = KeepLastEpochs(out, keep=keep, total_epochs=epochs, fmt=fmt)
    callbacks: list[Any] = [keeper]
    if on_epoch is not None:
        callbacks.append(ReportEpochs(on_epoch, epochs))
    start = time.perf_counter()
    history = net.fit(
        dataset.x_train,
        dataset.y_train,
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
        callbacks=callbacks,
    )
    metrics = {name: float(values[-1]) for name, values in history.history.items()}
    return TrainResult(
        files=list(keeper.written),
        epochs=epochs,
        seed=seed,
        data=dataset.name,
        metrics=metrics,
        seconds=time.perf_counter() - start,
    )


def make_deterministic(keras: Any, seed: int) -> None:
    """Seed Python, numpy and the backend; on TensorFlow also turn on op determinism.

    `keras.utils.set_random_seed` seeds every backend. TensorFlow can still pick
    nondeterministic kernels unless op determinism is on (for the whole process); JAX on the
    CPU is deterministic as it is. TensorFlow is imported only when it is the backend.
    """
    with keras_logs_quiet():  # on JAX, Keras seeds TensorFlow too if it is installed
        keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def case_study_model(
    keras: Any, optimizer: str = "adam", learning_rate: float | None = None
) -> Any:
    """The tutorial's MLP, compiled with categorical cross-entropy and accuracy.

    The learning rate is constant: Adam 0.001 and SGD 0.01 (momentum 0.9) unless given.
    """
    # Fixed names: otherwise Keras numbers layers per process (dense, dense_2, ...) and two
    # runs in one process would store their tensors under different names.
    net = keras.Sequential(
        [
            keras.Input(shape=(2,), name="features"),
            keras.layers.Dense(25, activation="relu", name="hidden"),
            keras.layers.Dense(3, activation="softmax", name="classes"),
        ],
        name="case_study",
    )
    return _compiled(keras, net, optimizer, learning_rate)


def digits_model(keras: Any, optimizer: str = "adam", learning_rate: float | None = None) -> Any:
    """A small Conv+BatchNorm net for the built-in digits data (the bn-update demo)."""
    net = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1), name="image"),
            keras.layers.Conv2D(16, 3, name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.Activation("relu", name="relu1"),
            keras.layers.Conv2D(32, 3, name="conv2"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.Activation("relu", name="relu2"),
            keras.layers.GlobalAveragePooling2D(name="pool"),
            keras.layers.Dense(10, activation="softmax", name="classes"),
        ],
        name="digits_convbn",
    )
    return _compiled(keras, net, optimizer, learning_rate)


def _compiled(keras: Any, net: Any, optimizer: str, learning_rate: float | None) -> Any:
    """`net` compiled for classification, as both built-in models are."""
    net.compile(
        loss="categorical_crossentropy",
        optimizer=_optimizer(keras, optimizer, learning_rate),
        metrics=["accuracy"],
    )
    return net


def _optimizer(keras: Any, optimizer: str, learning_rate: float | None) -> Any:
    if optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate or 0.01, momentum=0.9, name="sgd")
    return keras.optimizers.Adam(learning_rate=learning_rate or 0.001, name="adam")


def _model(
    keras: Any,
    dataset: Dataset,
    optimizer: str | None,
    model: str | os.PathLike[str] | None,
    custom_objects: str | None,
    trust: bool,
    learning_rate: float | None = None,
) -> Any:
    if model is None and dataset.name == DIGITS:
        return digits_model(keras, optimizer or "adam", learning_rate)
    if model is None:
        if dataset.x_train.shape[1:] != (2,) or dataset.y_train.shape[1:] != (3,):
            raise UsageError(
                f"the built-in model takes 2 features and 3 one-hot classes; {dataset.name} "
                f"has x {dataset.x_train.shape[1:]} and y {dataset.y_train.shape[1:]}, so "
                "pass --model FILE.keras with a compiled model that fits it"
            )
        return case_study_model(keras, optimizer or "adam", learning_rate)
    net = load_model(model, trust=trust, custom_objects=custom_objects, compile=True)
    if getattr(net, "optimizer", None) is None or not getattr(net, "compiled", True):
        raise UsageError(f"{model}: the model is not compiled; compile it before saving it")
    return net


def _check_options(
    epochs: int,
    keep: int,
    optimizer: str | None,
    fmt: str,
    model: str | os.PathLike[str] | None,
    batch_size: int,
    learning_rate: float | None = None,
) -> None:
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    if not 1 <= keep <= epochs:
        raise UsageError(f"--keep must be between 1 and --epochs ({epochs}), got {keep}")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if learning_rate is not None and not (0 < learning_rate < float("inf")):
        raise UsageError(f"--lr must be a positive number, got {learning_rate}")
    if learning_rate is not None and model is not None:
        raise UsageError("--lr applies to the built-in model; a --model file keeps its optimizer")
    if optimizer is not None and model is not None:
        raise UsageError(
            "--optimizer applies to the built-in model; a --model file trains with the "
            "optimizer it was compiled with"
        )
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _prepare_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create the output directory and prove a file can be written there, before training."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".wavg-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputError(out, f"cannot write checkpoints there ({exc.strerror or exc})") from None
    return out
