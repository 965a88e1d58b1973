"""The registry's table: each kind of location, local or in a bucket, and what opens it.

Every command recognises a location through `wavg.formats.registry`: combine, and model
loading (evaluate, bn-update, soup) through `read_model_config`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import multifile as hm
from support.remote import BUCKET, put

from wavg.errors import CheckpointError
from wavg.formats.orbax.steps import STEP_METADATA, StepUrl
from wavg.formats.registry import (
    BYTES,
    RECOGNISERS,
    expand_checkpoint_dirs,
    open_checkpoint,
    recognise,
)
from wavg.storage import remote
from wavg.storage.locations import Url
from wavg.workflows.model_loading import read_model_config

OPENED = {  # kind -> the checkpoint class that opens it
    "HDF5 (.h5, .weights.h5)": "H5Checkpoint",
    ".keras archive": "KerasCheckpoint",
    "sharded weights index": "ShardedCheckpoint",
    "unzipped .keras folder": "KerasFolderCheckpoint",
}


def _kind(location) -> str:
    """The kind the table gives `location`, checked against the class that opens it."""
    row, offered = recognise(location)
    if row.looks_at == BYTES:
        offered.release()
    if row.kind in OPENED:
        ckpt = open_checkpoint(location)
        try:
            assert type(ckpt).__name__ == OPENED[row.kind]
        finally:
            ckpt.close()
    return row.kind


def _fake_step(folder: Path) -> Path:
    """A folder recognised as an Orbax step (recognising reads only its listing)."""
    folder.mkdir(parents=True)
    (folder / STEP_METADATA).write_text("{}")
    return folder


def test_the_table_names_each_kind_once_in_the_order_it_is_asked():
    kinds = [(r.kind, r.looks_at) for r in RECOGNISERS]
    assert len(set(kinds)) == len(kinds)
    assert [k for k, _ in kinds] == [
        "Orbax root",
        "Orbax root or step",
        "Orbax step",
        "Orbax step",
        "unzipped .keras folder",
        "unzipped .keras folder",
        "sharded weights index",
        ".keras archive",
        "HDF5 (.h5, .weights.h5)",
    ]
    assert all((r.opens is None) != (r.expands is None) for r in RECOGNISERS)


def test_each_kind_of_local_location_is_opened_by_its_format(runs, multi, tmp_path):
    files = runs["mlp"].files
    assert _kind(files["h5"][0]) == "HDF5 (.h5, .weights.h5)"
    assert _kind(files["weights.h5"][0]) == "HDF5 (.h5, .weights.h5)"
    assert _kind(files["keras"][0]) == ".keras archive"
    assert _kind(multi.sharded[0]) == "sharded weights index"
    assert _kind(multi.folders[0]) == "unzipped .keras folder"
    assert _kind(str(multi.folders[0])) == "unzipped .keras folder"
    assert _kind(_fake_step(tmp_path / "one" / "7")) == "Orbax step"


def test_an_orbax_root_stands_for_its_steps_and_every_other_location_for_itself(runs, tmp_path):
    root = tmp_path / "root"
    steps = [_fake_step(root / str(n)) for n in (10, 2)]
    other = runs["mlp"].files["h5"][0]
    url = Url("s3://bucket/run/model_1.h5")  # named like a file: never listed
    found, warnings = expand_checkpoint_dirs([root, other, url])
    assert found == [steps[1], steps[0], other, url] and warnings == []


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "is empty"),
        (b"PK\x03", "too short to be a checkpoint"),
        (b"not a checkpoint at all", r"not a Keras checkpoint \(neither HDF5 nor a \.keras"),
    ],
)
def test_bytes_no_format_recognises_are_refused_by_name(tmp_path, content, problem):
    path = tmp_path / "model_1.h5"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=problem):
        recognise(path)


def test_a_folder_no_format_recognises_is_refused_as_a_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        recognise(tmp_path / "empty")


@pytest.fixture
def bucket(s3, monkeypatch):
    """The S3 server with a fresh client and quick retries, its request log cleared."""
    import s3fs

    client, recorder = s3
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)
    recorder.failures, recorder.hook = 0, None
    recorder.log.clear()
    return client, recorder


def _put_folder(client, folder: Path, prefix: str) -> str:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder)}")
    return f"s3://{BUCKET}/{prefix}"


def _listings(recorder) -> int:
    """Requests to the bucket itself: listings (an object's requests name its key)."""
    return sum(1 for _, path, _ in recorder.log if path.rstrip("/") == f"/{BUCKET}")


def test_each_kind_of_url_is_opened_by_its_format_and_objects_are_never_listed(bucket, runs, multi):
    client, recorder = bucket
    files = runs["mlp"].files
    h5, weights, keras_file = (
        put(client, [files[fmt][0]], f"table/{fmt}")[0] for fmt in ("h5", "weights.h5", "keras")
    )
    index = put(client, [multi.sharded[0], *hm.shard_names_paths(multi.sharded[0])], "table/ix")[0]
    recorder.log.clear()
    assert _kind(h5) == _kind(weights) == "HDF5 (.h5, .weights.h5)"
    assert _kind(keras_file) == ".keras archive"
    assert _kind(index) == "sharded weights index"
    assert _listings(recorder) == 0  # an object is asked for once, by its key
    folder = _put_folder(client, multi.folders[0], "table/folder")
    assert _kind(folder) == _kind(f"{folder}/") == "unzipped .keras folder"
    # Opening a folder asks storage once what the URL names (fsspec's info: a HEAD, then a
    # listing of one key), then lists the folder once; nothing is asked twice.
    recorder.log.clear()
    open_checkpoint(folder).close()
    assert _listings(recorder) == 2
    assert sum(1 for m, p, _ in recorder.log if m == "HEAD" and p.endswith("/table/folder")) == 1
    assert _kind(StepUrl(f"s3://{BUCKET}/table/7")) == "Orbax step"  # found by a root's listing


def test_a_prefix_no_format_recognises_is_refused_as_a_prefix(bucket, runs):
    client, _ = bucket
    put(client, [runs["mlp"].files["h5"][0]], "table/plain")
    with pytest.raises(CheckpointError, match=r"is a directory \(a prefix\), not a checkpoint"):
        recognise(f"s3://{BUCKET}/table")


def test_a_prefix_of_checkpoints_is_refused_with_the_glob_that_names_them(bucket, runs):
    client, _ = bucket
    put(client, runs["mlp"].files["h5"][:2], "table/two")
    with pytest.raises(CheckpointError) as raised:
        recognise(f"s3://{BUCKET}/table/two")
    assert str(raised.value) == (
        f"s3://{BUCKET}/table/two: is a directory (a prefix), not a checkpoint; "
        f"it holds 2 .h5 files: pass 's3://{BUCKET}/table/two/*.h5'"
    )


def test_model_loading_reads_a_config_wherever_combine_reads_a_checkpoint(bucket, runs, multi):
    client, _ = bucket
    local = runs["mlp"].files["keras"][0]
    url = put(client, [local], "configs")[0]
    assert read_model_config(url) == read_model_config(local)
    folder = _put_folder(client, multi.folders[-1], "configs/folder")
    assert read_model_config(folder) == read_model_config(multi.folders[-1])
    assert read_model_config(multi.folders[-1])["class_name"] == "Sequential"
