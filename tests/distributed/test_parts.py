"""``wavg combine --part I/N`` then ``wavg commit``: N processes that never talk write one
sharded output, locally and in a bucket, equal bit for bit to a single-process ``combine``;
a missing, stale or foreign part is refused by the commit, naming it, with nothing written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import keras3_formats as k3
from support import multifile as hm
from support import safety as hs
from support.remote import BUCKET, keys, put

import wavg
from wavg.averaging.partition import split_by_bytes


@pytest.fixture(scope="module")
def files(tmp_path_factory, keras_module):
    return k3.save_run(tmp_path_factory.mktemp("k3"))


@pytest.fixture(scope="module")
def single(files, tmp_path_factory):
    """The single-process outputs the parts must equal, per format."""
    directory = tmp_path_factory.mktemp("single")
    found = {}
    for fmt in k3.FORMATS:
        out = directory / f"{fmt.replace('.', '_')}.weights.json"
        wavg.combine(files[fmt], out, max_shard_gb=2e-6)
        found[fmt] = hm.sharded_tensors(out)
    return found


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes(), name


def only_output_files(out: Path) -> None:
    """After a commit: the index, its shards and the placeholder; no part record."""
    names = {p.name for p in out.parent.iterdir()}
    assert names == {out.name, "avg_00000.weights.h5", *hm.shard_names(out)}


@given(
    sizes=st.lists(st.integers(0, 10_000), max_size=60),
    parts=st.integers(1, 12),
)
def test_the_split_is_contiguous_complete_and_balanced_within_one_tensor(sizes, parts):
    ranges = split_by_bytes(sizes, parts)
    assert len(ranges) == parts
    assert [i for r in ranges for i in r] == list(range(len(sizes)))
    total = sum(sizes)
    for span in ranges:
        got = sum(sizes[i] for i in span)
        assert abs(got - total / parts) <= max(sizes, default=0)
    assert split_by_bytes(sizes, parts) == ranges  # a pure function


@pytest.mark.parametrize(
    ("fmt", "count"), [("keras", 1), ("weights.h5", 2), ("folder", 3), ("weights.json", 4)]
)
def test_parts_then_commit_equal_the_single_process_output(fmt, count, files, single, tmp_path):
    out = tmp_path / "avg.weights.json"
    for index in range(1, count + 1):
        summary = wavg.combine(files[fmt], out, max_shard_gb=2e-6, part=(index, count))
        assert summary.part == f"{index}/{count}"
        assert not out.exists()  # nothing is an output before the commit
    done = wavg.commit(out)
    assert done.parts == count
    assert_same_tensors(hm.sharded_tensors(out), single[fmt])
    only_output_files(out)


def test_independent_processes_and_a_retried_part_commit_an_output_keras_loads(files, tmp_path):
    out = tmp_path / "avg.weights.json"
    args = ["combine", *files["keras"], "-o", out, "--max-shard-size", "2e-6"]
    for part in ("2/3", "1/3", "3/3", "2/3"):  # any order; part 2 twice, as a retry would
        result = hs.run_wavg([*args, "--part", part])
        assert result.code == 0, result.stderr
    result = hs.run_wavg(["commit", out, "--json"])
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["parts"] == 3
    only_output_files(out)
    reference = tmp_path / "ref" / "avg.weights.h5"
    reference.parent.mkdir()
    wavg.combine(files["weights.h5"], reference)
    k3.assert_same_bits(k3.keras_state(out), k3.keras_state(reference))


def test_a_new_distributed_output_replaces_the_previous_one_and_retires_its_shards(files, tmp_path):
    out = tmp_path / "avg.weights.json"
    wavg.combine(files["weights.h5"], out, max_shard_gb=2e-6)
    old = set(hm.shard_names(out))
    for index in (1, 2):
        wavg.combine(files["keras"][1:], out, max_shard_gb=2e-6, part=(index, 2))
    wavg.commit(out)
    assert not old & set(hm.shard_names(out))
    only_output_files(out)


def parts_written(files, out: Path, indexes, count: int, inputs=None) -> None:
    for index in indexes:
        wavg.combine(inputs or files["weights.h5"], out, max_shard_gb=2e-6, part=(index, count))


@pytest.fixture
def previous(files, tmp_path) -> tuple[Path, dict[str, str]]:
    """A committed output in `tmp_path`, and its state (which a refused commit keeps)."""
    out = tmp_path / "avg.weights.json"
    wavg.combine(files["keras"], out, max_shard_gb=2e-6)
    return out, hm.output_state(out)


def assert_refused(out: Path, state: dict, capfd, *words: str) -> None:
    before = sorted(p.name for p in out.parent.iterdir())
    result = hs.run_cli(["commit", out], capfd)
    hs.assert_one_line_error(result, [out, *words])
    assert hm.output_state(out) == state
    assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing written or removed


def test_a_missing_part_is_refused_naming_it(files, previous, capfd):
    out, state = previous
    parts_written(files, out, (1, 3), 3)
    assert_refused(out, state, capfd, "part 2/3", "missing")


def test_records_of_an_abandoned_run_of_another_n_do_not_block_the_commit(files, tmp_path):
    out = tmp_path / "avg.weights.json"
    parts_written(files, out, (1, 2), 3)  # abandoned
    parts_written(files, out, (1, 2), 2)
    assert wavg.commit(out).parts == 2
    assert not [p for p in tmp_path.iterdir() if ".wavg-part-" in p.name]


def test_a_part_of_another_input_set_is_refused_naming_it(files, previous, capfd):
    out, state = previous
    parts_written(files, out, (1, 3), 3)
    parts_written(files, out, (2,), 3, inputs=files["weights.h5"][1:])
    assert_refused(out, state, capfd, "part 2/3", "another plan")


def test_an_input_changed_between_parts_is_refused_naming_the_part(
    files, previous, tmp_path, capfd
):
    out, state = previous
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    copies = [Path(shutil.copy(f, inputs)) for f in files["weights.h5"]]
    parts_written(files, out, (1, 2), 3, inputs=copies)
    stat = copies[0].stat()
    os.utime(copies[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten
    parts_written(files, out, (3,), 3, inputs=copies)
    assert_refused(out, state, capfd, "part 3/3", "another plan")


def test_a_part_whose_shard_is_gone_is_refused_naming_it(files, previous, capfd):
    out, state = previous
    parts_written(files, out, (1, 2), 2)
    record = json.loads((out.parent / f".{out.name}.wavg-part-2-of-2").read_text())
    (out.parent / record["shards"][0]["name"]).unlink()
    assert_refused(out, state, capfd, "part 2/2", record["shards"][0]["name"])


def test_nothing_to_commit_is_one_line(tmp_path, capfd):
    result = hs.run_cli(["commit", tmp_path / "avg.weights.json"], capfd)
    hs.assert_one_line_error(result, ["no parts"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--part", "3/2"], ["--part"]),
        (["--part", "x"], ["--part"]),
    ],
)
def test_a_bad_part_is_a_usage_error(args, words, files, tmp_path, capfd):
    result = hs.run_cli(
        ["combine", *files["keras"], "-o", tmp_path / "a.weights.json", *args], capfd
    )
    hs.assert_one_line_error(result, words, code=2)
    assert list(tmp_path.iterdir()) == []


def test_parts_refuse_legacy_h5_inputs_and_other_outputs(files, samples, tmp_path, capfd):
    result = hs.run_cli(
        ["combine", *samples[:2], "-o", tmp_path / "a.weights.json", "--part", "1/2"], capfd
    )
    line = hs.assert_one_line_error(result, [samples[1]], code=2)
    assert "without --part" in line
    result = hs.run_cli(
        ["combine", *files["keras"], "-o", tmp_path / "a.keras", "--part", "1/2"], capfd
    )
    hs.assert_one_line_error(result, [".weights.json"], code=2)
    assert list(tmp_path.iterdir()) == []


def test_parts_and_commit_in_a_bucket_equal_the_local_result(files, single, s3, tmp_path):
    client, recorder = s3
    urls = put(
        client,
        files["weights.json"]
        + [p.parent / n for p in files["weights.json"] for n in hm.shard_names(p)],
        "parts-in",
    )
    inputs = [u for u in urls if u.endswith(".weights.json")]
    out = f"s3://{BUCKET}/parts-out/avg.weights.json"
    for part in ("1/2", "2/2"):
        result = hs.run_wavg(
            ["combine", *inputs, "-o", out, "--max-shard-size", "2e-6", "--part", part]
        )
        assert result.code == 0, result.stderr
    result = hs.run_wavg(["commit", out])
    assert result.code == 0, result.stderr
    back = tmp_path / "back"
    back.mkdir()
    for key in keys(client, "parts-out/"):
        client.download_file(BUCKET, key, str(back / key.rsplit("/", 1)[1]))
    assert_same_tensors(hm.sharded_tensors(back / "avg.weights.json"), single["weights.json"])
    only_output_files(back / "avg.weights.json")
