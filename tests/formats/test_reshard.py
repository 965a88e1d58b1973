"""A sharded ``.weights.json`` output from every input format whose weights are Keras 3's
tree, cut as Keras' ``max_shard_size`` cuts them: Keras' own ``load_weights`` reads it, and
what it loads is, bit for bit, the same average written as one ``.weights.h5``."""

from __future__ import annotations

import json

import pytest
from support import keras3_formats as k3
from support import safety as hs
from support.multifile import shard_names

import wavg


@pytest.fixture(scope="module")
def files(tmp_path_factory, keras_module):
    return k3.save_run(tmp_path_factory.mktemp("k3"))


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "avg.weights.h5"
    wavg.combine(files["weights.h5"], out)
    return k3.keras_state(out)


@pytest.mark.parametrize("fmt", k3.FORMATS)
def test_every_keras3_format_averages_into_shards_keras_loads_bit_for_bit(
    fmt, files, reference, tmp_path
):
    out = tmp_path / "avg.weights.json"
    with hs.inputs_untouched([p for p in files[fmt] if p.is_file()]):
        summary = wavg.combine(files[fmt], out, max_shard_gb=2e-6)
    assert summary.tensors > 0
    names = shard_names(out)
    assert len(names) > 1  # cut by the shard size
    k3.assert_same_bits(k3.keras_state(out), reference)
    # The folder holds the index, its shards and Keras' placeholder only.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["avg.weights.json", "avg_00000.weights.h5", *names]
    )


def test_shards_follow_keras_rule_and_the_default_size_is_one_shard(files, tmp_path):
    one = tmp_path / "one.weights.json"
    wavg.combine(files["keras"], one)
    assert len(shard_names(one)) == 1
    document = json.loads(one.read_text())
    assert all(isinstance(v, list) for v in document["weight_map"].values())
    assert document["metadata"]["total_size"] > 0
    # Sharded inputs keep their own shards unless a size is given.
    kept = tmp_path / "kept.weights.json"
    wavg.combine(files["weights.json"], kept)
    assert len(shard_names(kept)) == len(shard_names(files["weights.json"][-1]))


def test_max_shard_size_on_another_output_is_a_usage_error(files, tmp_path, capfd):
    result = hs.run_cli(
        ["combine", *files["keras"], "-o", tmp_path / "a.keras", "--max-shard-size", "1"], capfd
    )
    hs.assert_one_line_error(result, ["--max-shard-size"], code=2)
    assert list(tmp_path.iterdir()) == []


def test_legacy_h5_inputs_still_refuse_a_weights_json_output(samples, tmp_path, capfd):
    result = hs.run_cli(["combine", *samples[:2], "-o", tmp_path / "a.weights.json"], capfd)
    hs.assert_one_line_error(result, [".h5"], code=2)
    assert list(tmp_path.iterdir()) == []
