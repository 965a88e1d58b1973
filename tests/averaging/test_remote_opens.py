"""Opening remote inputs costs round trips, not inputs: behind a proxy that delays every
request/response turn, the chain of round trips a run waits for one after another is no
longer for eight inputs than for two, and the average is bit-identical to the local one."""

from __future__ import annotations

import os

import numpy as np
import pytest
from support.kerasfiles import assert_one_line_error, run_wavg
from support.latency_proxy import LatencyProxy
from support.remote import put

DELAY = 0.1  # seconds per round trip: concurrent requests overlap by far more than jitter


@pytest.fixture(scope="module")
def one_run(tmp_path_factory, keras_module):
    """Eight .weights.h5 checkpoints of one run whose tensors (128 KB kernels) lie between
    their HDF5 object headers, so reading the structure costs reads across the file."""
    keras = keras_module
    model = keras.Sequential([keras.Input((256,))] + [keras.layers.Dense(128) for _ in range(4)])
    rng = np.random.default_rng(5)
    directory = tmp_path_factory.mktemp("one_run")
    files = []
    for epoch in range(8):
        model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.weights])
        path = directory / f"ckpt_{epoch}.weights.h5"
        model.save_weights(path)
        files.append(path)
    return files


def test_the_round_trips_to_open_inputs_do_not_grow_with_their_number(
    s3, one_run, tmp_path, monkeypatch
):
    import s3fs

    client, _ = s3
    urls = put(client, one_run, "opens")
    counts = {}
    with LatencyProxy(os.environ["AWS_ENDPOINT_URL"], delay=DELAY) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        for n in (2, 8):
            proxy.reset()
            out = tmp_path / f"remote_{n}.weights.h5"
            code, _, err = run_wavg("combine", *urls[:n], "-o", out)
            assert code == 0, err
            counts[n] = proxy.sequential()
            assert len(proxy.turns) > counts[n]  # some turns overlapped
            local = tmp_path / f"local_{n}.weights.h5"
            assert run_wavg("combine", *one_run[:n], "-o", local)[0] == 0
            assert out.read_bytes() == local.read_bytes()
    s3fs.S3FileSystem.clear_instance_cache()
    assert counts[8] <= counts[2], counts


def test_the_requests_in_flight_are_bounded_by_the_environment(s3, one_run, tmp_path, monkeypatch):
    import s3fs

    client, _ = s3
    urls = put(client, one_run, "bounded")
    local = tmp_path / "local.weights.h5"
    assert run_wavg("combine", *one_run, "-o", local)[0] == 0
    monkeypatch.setenv("WAVG_MAX_REQUESTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    out = tmp_path / "one_at_a_time.weights.h5"
    code, _, err = run_wavg("combine", *urls, "-o", out)
    assert code == 0, err
    assert out.read_bytes() == local.read_bytes()
    monkeypatch.setenv("WAVG_MAX_REQUESTS", "none")
    s3fs.S3FileSystem.clear_instance_cache()
    code, _, err = run_wavg("combine", *urls, "-o", tmp_path / "refused.weights.h5")
    assert_one_line_error(code, err, "WAVG_MAX_REQUESTS", exit_code=2)
    assert not (tmp_path / "refused.weights.h5").exists()


def _run_of(keras, directory, layers: int, suffix: str) -> list:
    """Two checkpoints of a stack of `layers` Dense layers whose 256 KB kernels lie between
    their HDF5 object headers: the structure spreads over the file, a page or more apart."""
    model = keras.Sequential(
        [keras.Input((256,))] + [keras.layers.Dense(256) for _ in range(layers)]
    )
    rng = np.random.default_rng(layers)
    files = []
    for epoch in (1, 2):
        model.set_weights([rng.standard_normal(w.shape).astype("float32") for w in model.weights])
        path = directory / f"l{layers}_{epoch}{suffix}"
        model.save(path) if suffix == ".h5" else model.save_weights(path)
        files.append(path)
    return files


@pytest.mark.parametrize("suffix", [".h5", ".weights.h5"])
def test_the_round_trips_to_walk_the_first_input_hardly_grow_with_its_layers(
    s3, tmp_path, monkeypatch, keras_module, suffix
):
    """The first input's structure is fetched a tree level per round, ahead of libhdf5's
    walk, which would wait for each object's page in turn (measured before: 50 sequential
    round trips for 40 layers, 96 for 80). Layers added cost a fraction of a round trip each,
    not one or more, and the result equals the local one."""
    import s3fs

    client, _ = s3
    counts = {}
    with LatencyProxy(os.environ["AWS_ENDPOINT_URL"], delay=DELAY) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        for layers in (20, 60):
            files = _run_of(keras_module, tmp_path, layers, suffix)
            urls = put(client, files, f"walk{layers}{suffix}")
            proxy.reset()
            out = tmp_path / f"remote_{layers}{suffix}"
            code, _, err = run_wavg("combine", *urls, "-o", out)
            assert code == 0, err
            counts[layers] = proxy.sequential()
            local = tmp_path / f"local_{layers}{suffix}"
            assert run_wavg("combine", *files, "-o", local)[0] == 0
            assert out.read_bytes() == local.read_bytes()
    s3fs.S3FileSystem.clear_instance_cache()
    print(f"sequential round trips by layer count: {counts}")
    assert counts[60] - counts[20] <= (60 - 20) // 4, counts
