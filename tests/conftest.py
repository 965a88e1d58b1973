"""Shared fixtures: real checkpoints written by Keras, made once per test session.

Each model family is trained for a few steps between saves, so its checkpoints differ the
way one run's last epochs do, and is saved in every format wavg supports. The weights Keras
reports after each save are kept as the reference for the averages.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from support.keras_runs import BUILDERS, FORMATS, MULTI_FILE, Run, save_checkpoint, train_run

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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
    for name in BUILDERS:
        formats = ("keras", "weights.h5") if name == "subclassed" else FORMATS
        out[name] = train_run(keras, name, tmp_path_factory.mktemp(name), rng, formats)
    return out


@pytest.fixture(scope="session")
def multi_file_run(tmp_path_factory, keras_module) -> Run:
    """The conv_bn family trained as in `runs`, saved as sharded weights (a few ~1 kB shards
    per checkpoint) and as unzipped ``.keras`` folders: small multi-file checkpoints."""
    keras = keras_module
    keras.utils.set_random_seed(11)
    rng = np.random.default_rng(11)
    return train_run(keras, "conv_bn", tmp_path_factory.mktemp("multi_file"), rng, MULTI_FILE)


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


@pytest.fixture(scope="session")
def kf(tmp_path_factory) -> Path:
    """Keras checkpoints in every format for the safety tests (see support.safety)."""
    from support import safety

    return safety.keras_fixtures(tmp_path_factory)


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> list[Path]:
    """A session copy of the case-study sample checkpoints for the safety tests."""
    from support import safety

    return safety.samples(tmp_path_factory)


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
    """Sharded checkpoints and unzipped folders of one run (see support.multifile)."""
    from support import multifile as hm

    return hm.multi_run(tmp_path_factory.mktemp("multi"))


@pytest.fixture(scope="session")
def orbax_roots(tmp_path_factory) -> Path:
    """``<backend>/<kind>``: OrbaxCheckpoint roots written by Keras (see support.orbax_runs)."""
    from support import orbax_runs

    return orbax_runs.train_roots(tmp_path_factory.mktemp("orbax"))


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server for one test module, and the environment pointing boto at it."""
    from moto.server import ThreadedMotoServer
    from support.remote import BUCKET, SECRET, Recorder

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
