"""The HDF5 structure prefetch is a hint: on a file Keras wrote it fetches, in a few rounds,
every page libhdf5's walk then reads (the walk asks for no page of its own); on a damaged or
hostile file it stops quietly, within the page cache's bound, and leaves the errors to the
walk and the checks that report them."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wavg.formats.h5file import H5Checkpoint
from wavg.formats.hdf5.prefetch import prefetch_structure

SAMPLE = Path(__file__).parents[2] / "sample_checkpoints" / "model_499.h5"


def _in_memory(data: bytes, name: str = "model.h5") -> str:
    """A URL of fsspec's in-memory filesystem holding `data` (a remote source with a page
    cache and request counters, without a server)."""
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://wavg-prefetch/{uuid.uuid4().hex}/{name}"
    with fsspec.open(url, "wb") as f:
        f.write(data)
    return url


def test_after_the_prefetch_the_walk_of_a_keras_file_fetches_no_page(tmp_path, keras_module):
    from wavg.storage import remote

    keras = keras_module
    model = keras.Sequential([keras.Input((256,))] + [keras.layers.Dense(256) for _ in range(12)])
    path = tmp_path / "spread.h5"
    model.save(path)  # 256 KB kernels between the layers' headers: structure on many pages
    source = remote.RemoteFile(_in_memory(path.read_bytes()))
    rounds = prefetch_structure(source, 0, source.size)
    fetched = source.requests
    assert 1 < rounds < 20
    checkpoint = H5Checkpoint(source)  # walks with libhdf5 (and prefetches again: all cached)
    assert checkpoint.tensors
    walked = source.requests - fetched
    assert walked == 0, f"the walk fetched {walked} page run(s) the prefetch missed"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_damaged_structure_stops_the_prefetch_quietly(flips):
    from wavg.storage import remote

    data = bytearray(SAMPLE.read_bytes())
    for at, value in flips:  # the superblock, the root group and the first objects
        data[at % len(data)] = value
    source = remote.RemoteFile(_in_memory(bytes(data)))
    rounds = prefetch_structure(source, 0, source.size)
    assert 0 <= rounds <= 64
    assert len(source._pages) <= remote.MAX_PAGES


def test_bytes_that_are_no_hdf5_file_cost_one_round():
    from wavg.storage import remote

    source = remote.RemoteFile(_in_memory(np.arange(4096, dtype=np.uint8).tobytes(), "x.h5"))
    assert prefetch_structure(source, 0, source.size) == 1
