"""Shared fixtures: real checkpoints written by Keras, made once per test session.

Each model family is trained for a few steps between saves, so its checkpoints differ the
way one run's last epochs do, and is saved in every format wavg supports. The weights Keras
reports after each save are kept as the reference for the averages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
FORMATS = ("h5", "keras", "weights.h5")


@dataclass
class Run:
    """Checkpoints of one short training run: files per format, oldest first."""

    name: str
    model: object  # the live keras model (architecture for load_weights)
    files: dict[str, list[Path]] = field(default_factory=dict)
    weights: list[list[np.ndarray]] = field(default_factory=list)  # per checkpoint
    x: np.ndarray | None = None


def _mlp(keras):
    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(25, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def _conv_bn(keras):
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.2),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def _lstm(keras):
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(20, 4),
            keras.layers.LSTM(6),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def _subclassed(keras):
    @keras.saving.register_keras_serializable(package="wavg_tests")
    class TwoTower(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.left = keras.layers.Dense(6, activation="tanh")
            self.right = keras.layers.Dense(6, activation="relu")
            self.head = keras.layers.Dense(3, activation="softmax")

        def call(self, x):
            return self.head(self.left(x) + self.right(x))

    model = TwoTower()
    model(np.zeros((1, 2), dtype="float32"))
    return model


def _inputs(name: str, rng: np.random.Generator) -> np.ndarray:
    if name == "conv_bn":
        return rng.random((16, 8, 8, 1), dtype=np.float32)
    if name == "lstm":
        return rng.integers(0, 20, size=(16, 5)).astype("int32")
    return rng.random((16, 2), dtype=np.float32)


BUILDERS = {"mlp": _mlp, "conv_bn": _conv_bn, "lstm": _lstm, "subclassed": _subclassed}


@pytest.fixture(scope="session")
def keras_module():
    import keras

    return keras


@pytest.fixture(scope="session")
def runs(tmp_path_factory, keras_module) -> dict[str, Run]:
    """Four model families x three checkpoints x every format they can be saved in."""
    keras = keras_module
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    out: dict[str, Run] = {}
    for name, build in BUILDERS.items():
        directory = tmp_path_factory.mktemp(name)
        model = build(keras)
        # Named: Keras numbers unnamed optimizers per process ("adam_1", ...), and the tests
        # look for this one's state by name whatever ran before them.
        model.compile(optimizer=keras.optimizers.Adam(name="adam"), loss="categorical_crossentropy")
        x = _inputs(name, rng)
        y = keras.utils.to_categorical(rng.integers(0, 3, len(x)), 3)
        run = Run(name, model, x=x)
        formats = ("keras", "weights.h5") if name == "subclassed" else FORMATS
        for epoch in range(3):
            model.fit(x, y, epochs=2, batch_size=4, verbose=0)
            save_checkpoint(run, directory / f"{name}_{epoch}", formats)
        out[name] = run
    return out


@pytest.fixture(scope="session")
def dtype_runs(tmp_path_factory, keras_module) -> dict[str, Run]:
    """A Dense model in float16, bfloat16 and float64, saved in every format."""
    keras = keras_module
    out = {}
    for dtype in ("float16", "bfloat16", "float64"):
        directory = tmp_path_factory.mktemp(dtype)
        model = keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(5, dtype=dtype),
                keras.layers.Dense(2, dtype=dtype),
            ]
        )
        rng = np.random.default_rng(1)
        run = Run(dtype, model)
        for epoch in range(3):
            model.set_weights(
                [rng.standard_normal(w.shape).astype(w.dtype) for w in model.get_weights()]
            )
            save_checkpoint(run, directory / f"m_{epoch}", FORMATS)
        out[dtype] = run
    return out


def save_checkpoint(run: Run, stem: Path, formats: tuple[str, ...]) -> None:
    """Save `run.model` as `stem.<fmt>` in each format and record its weights."""
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        run.model.save_weights(path) if fmt == "weights.h5" else run.model.save(path)
        run.files.setdefault(fmt, []).append(path)
    run.weights.append([np.array(w) for w in run.model.get_weights()])


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


@pytest.fixture(scope="session")
def kf(tmp_path_factory) -> Path:
    """Keras checkpoints in every format for the safety tests (see helpers_safety)."""
    import helpers_safety

    return helpers_safety.keras_fixtures(tmp_path_factory)


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> list[Path]:
    """A session copy of the case-study sample checkpoints for the safety tests."""
    import helpers_safety

    return helpers_safety.samples(tmp_path_factory)


@pytest.fixture(scope="session")
def big_weights(tmp_path_factory, keras_module):
    """Three .weights.h5 checkpoints of ~1.3 MB of weights plus twice that in Adam state."""
    keras = keras_module
    model = keras.Sequential(
        [keras.Input((256,)), keras.layers.Dense(640), keras.layers.Dense(256)]
    )
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(3)
    directory = tmp_path_factory.mktemp("big")
    files = []
    for epoch in range(3):
        model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.weights])
        for var in model.optimizer.variables:
            var.assign(rng.standard_normal(var.shape).astype(var.dtype))
        path = directory / f"big_{epoch}.weights.h5"
        model.save_weights(path)
        files.append(path)
    tensor_bytes = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    return files, tensor_bytes


@pytest.fixture(scope="session")
def multi(tmp_path_factory, keras_module):
    """Sharded checkpoints and unzipped folders of one run (see helpers_multifile)."""
    import helpers_multifile as hm

    return hm.multi_run(tmp_path_factory.mktemp("multi"))


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server for one test module, and the environment pointing boto at it."""
    from helpers_remote import BUCKET, SECRET, Recorder
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    recorder = Recorder(server._server.app)
    server._server.app = recorder
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",  # wavg's own bounded retries are under test
        "AWS_CONFIG_FILE": "/nonexistent/wavg-test-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/wavg-test-credentials",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client, recorder
    server.stop()
