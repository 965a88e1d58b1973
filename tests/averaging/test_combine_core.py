"""The streaming core on HDF5 files written directly with h5py (fast, and every storage
variant Keras does not write itself: chunked, compressed, big-endian, a user block)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support.reference import assert_exact_average

import wavg
from wavg.errors import CheckpointMismatch, NonFiniteValues, UsageError
from wavg.formats.registry import iter_blocks

BF16 = np.dtype(ml_dtypes.bfloat16)


def write_weights(path: Path, tensors: dict[str, np.ndarray], **dataset_options) -> Path:
    """A Keras-3-style .weights.h5 (layers/<name>/vars/<i>) holding `tensors`."""
    with h5py.File(path, "w", **dataset_options.pop("file_options", {})) as f:
        for name, value in tensors.items():
            if value.dtype == BF16:
                ds = f.create_dataset(name, data=value.view("V2"))
                ds.attrs["dtype"] = "bfloat16"
            else:
                f.create_dataset(name, data=value, **dataset_options)
        f.create_dataset("optimizer/vars/0", data=np.int64(7))
    return path


def read_weights(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:

        def take(name, obj):
            if isinstance(obj, h5py.Dataset):
                value = obj[()]
                value = np.asarray(value)
                out[name] = value.view(BF16) if obj.attrs.get("dtype") == "bfloat16" else value

        f.visititems(take)
    return out


float_dtypes = st.sampled_from([np.float16, np.float32, np.float64, BF16])
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)


@st.composite
def weight_files(draw):
    tensors = {}
    for i in range(draw(st.integers(1, 4))):
        dtype = np.dtype(draw(float_dtypes))
        shape = draw(shapes)
        values = draw(
            hnp.arrays(np.float32, shape, elements=st.floats(-1e4, 1e4, width=32))
        ).astype(dtype)
        tensors[f"layers/l{i}/vars/0"] = values
    return tensors


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tensors=weight_files(),
    copies=st.integers(1, 6),
    scheme=st.sampled_from(["equal", "linear", "exp"]),
    block=st.sampled_from([1, 3, 1 << 20]),
)
def test_averaging_copies_of_one_file_returns_it_bit_for_bit(
    tmp_path_factory, tensors, copies, scheme, block
):
    directory = tmp_path_factory.mktemp("copies")
    files = [write_weights(directory / f"m_{i}.weights.h5", tensors) for i in range(copies)]
    out = directory / "avg.weights.h5"
    plan = wavg.plan_combine(files, scheme=scheme, alpha=0.3)
    wavg.run_plan(plan, out, block_items=block)
    got = read_weights(out)
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype
        assert np.array_equal(
            np.atleast_1d(got[name]).view(np.uint8), np.atleast_1d(value).view(np.uint8)
        ), name


@given(
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7),
    budget=st.integers(1, 50),
)
def test_blocks_tile_the_array_in_memory_order(shape, budget):
    flat = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    position = 0
    for start, count, slices in iter_blocks(shape, 1, budget):
        assert start == position
        block = flat[slices] if slices else flat[()]
        assert np.array_equal(np.asarray(block).reshape(-1), np.arange(start, start + count))
        position += count
    assert position == flat.size


def make_series(
    directory: Path, n: int, **options
) -> tuple[list[Path], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(3)
    files, contents = [], []
    for i in range(n):
        tensors = {
            "layers/dense/vars/0": rng.standard_normal((37, 29)).astype(np.float32),
            "layers/dense/vars/1": rng.standard_normal(29).astype(np.float32),
            "layers/emb/vars/0": rng.standard_normal((4, 3, 5)).astype(np.float64),
        }
        files.append(write_weights(directory / f"m_{i}.weights.h5", tensors, **options))
        contents.append(tensors)
    return files, contents


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"chunks": True, "compression": "gzip", "shuffle": True},
        {"chunks": True, "fletcher32": True},
        {"file_options": {"userblock_size": 1024}},
    ],
    ids=["contiguous", "gzip", "checksummed", "userblock"],
)
@pytest.mark.parametrize("block", [7, 1 << 20])
def test_every_storage_layout_averages_to_the_same_exact_result(tmp_path, options, block):
    files, contents = make_series(tmp_path, 4, **options)
    out = tmp_path / "avg.weights.h5"
    plan = wavg.plan_combine(files, scheme="linear")
    wavg.run_plan(plan, out, block_items=block)
    got = read_weights(out)
    for name in contents[0]:
        assert_exact_average(got[name], [c[name] for c in contents], plan.raw_weights)
    assert got["optimizer/vars/0"] == 7


def test_big_endian_tensors_are_averaged_and_stay_big_endian(tmp_path):
    files = []
    for i, value in enumerate([1.0, 2.0, 4.0]):
        files.append(
            write_weights(
                tmp_path / f"m_{i}.weights.h5", {"layers/a/vars/0": np.full(5, value, ">f4")}
            )
        )
    wavg.combine(files, tmp_path / "avg.weights.h5")
    with h5py.File(tmp_path / "avg.weights.h5") as f:
        ds = f["layers/a/vars/0"]
        assert ds.dtype == np.dtype(">f4")
        assert np.array_equal(ds[()], np.full(5, 7 / 3, np.float32))


def test_a_row_larger_than_a_block_is_still_averaged_exactly(tmp_path):
    files, contents = make_series(tmp_path, 3, chunks=True, compression="gzip")
    out = tmp_path / "avg.weights.h5"
    plan = wavg.plan_combine(files)
    wavg.run_plan(plan, out, block_items=2)
    got = read_weights(out)
    name = "layers/dense/vars/0"
    assert_exact_average(got[name], [c[name] for c in contents], plan.raw_weights)


def test_zero_weight_checkpoints_are_not_read_but_still_checked(tmp_path):
    files, contents = make_series(tmp_path, 3)
    out = tmp_path / "avg.weights.h5"
    wavg.combine(files, out, weights=[0, 1, 1])
    got = read_weights(out)
    name = "layers/dense/vars/0"
    assert_exact_average(got[name], [c[name] for c in contents[1:]], [1, 1])
    write_weights(files[0], {"layers/other/vars/0": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointMismatch, match="has no tensor layers/dense/vars/0"):
        wavg.combine(files, tmp_path / "avg2.weights.h5", weights=[0, 1, 1])


def test_nan_is_refused_naming_file_and_tensor_unless_allowed(tmp_path):
    files, _ = make_series(tmp_path, 3)
    with h5py.File(files[1], "r+") as f:
        f["layers/dense/vars/1"][3] = np.nan
    out = tmp_path / "avg.weights.h5"
    with pytest.raises(
        NonFiniteValues, match=r"m_1\.weights\.h5: tensor layers/dense/vars/1 holds NaN"
    ):
        wavg.combine(files, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in files
    )
    wavg.combine(files, out, allow_nonfinite=True)
    assert np.isnan(read_weights(out)["layers/dense/vars/1"][3])


def test_shape_and_dtype_mismatches_name_the_tensor_and_both_files(tmp_path):
    files, _ = make_series(tmp_path, 2)
    write_weights(
        files[0],
        {
            "layers/dense/vars/0": np.zeros((37, 28), np.float32),
            "layers/dense/vars/1": np.zeros(29, np.float32),
            "layers/emb/vars/0": np.zeros((4, 3, 5), np.float64),
        },
    )
    with pytest.raises(CheckpointMismatch, match=r"m_0.*shape \(37, 28\) but \(37, 29\) in .*m_1"):
        wavg.combine(files, tmp_path / "avg.weights.h5")
    write_weights(
        files[0],
        {
            "layers/dense/vars/0": np.zeros((37, 29), np.float16),
            "layers/dense/vars/1": np.zeros(29, np.float32),
            "layers/emb/vars/0": np.zeros((4, 3, 5), np.float64),
        },
    )
    with pytest.raises(CheckpointMismatch, match="float16 but float32"):
        wavg.combine(files, tmp_path / "avg.weights.h5")


def test_output_that_is_an_input_is_refused_even_through_links(tmp_path):
    files, _ = make_series(tmp_path, 2)
    before = files[1].read_bytes()
    (tmp_path / "link.weights.h5").symlink_to(files[1])
    os.link(files[1], tmp_path / "hard.weights.h5")
    for out in (files[1], tmp_path / "link.weights.h5", tmp_path / "hard.weights.h5"):
        with pytest.raises(UsageError, match="inputs are never overwritten"):
            wavg.combine(files, out)
    assert files[1].read_bytes() == before


def test_the_same_file_twice_is_refused(tmp_path):
    files, _ = make_series(tmp_path, 2)
    os.link(files[0], tmp_path / "m_7.weights.h5")
    with pytest.raises(UsageError, match="same file"):
        wavg.combine([files[0], tmp_path / "m_7.weights.h5"], tmp_path / "avg.weights.h5")


def test_dry_run_checks_everything_and_writes_nothing(tmp_path):
    files, _ = make_series(tmp_path, 3)
    summary = wavg.combine(files, tmp_path / "avg.weights.h5", dry_run=True)
    assert summary.dry_run and summary.tensors == 3 and summary.copied_tensors == 1
    assert not (tmp_path / "avg.weights.h5").exists()
    files[0].write_bytes(b"not a checkpoint at all")
    with pytest.raises(wavg.WavgError, match="m_0.weights.h5"):
        wavg.combine(files, tmp_path / "avg.weights.h5", dry_run=True)


def test_a_previous_output_survives_a_failed_run(tmp_path):
    files, _ = make_series(tmp_path, 2)
    out = tmp_path / "avg.weights.h5"
    out.write_bytes(b"previous result")
    with h5py.File(files[0], "r+") as f:
        f["layers/dense/vars/1"][0] = np.inf
    with pytest.raises(NonFiniteValues):
        wavg.combine(files, out)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "avg.weights.h5",
        "m_0.weights.h5",
        "m_1.weights.h5",
    ]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )


def test_combine_never_imports_tensorflow_or_keras(tmp_path):
    files, _ = make_series(tmp_path, 2)
    code = (
        "import sys; from wavg.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "bad = [m for m in ('tensorflow', 'keras', 'torch', 'jax') if m in sys.modules]\n"
        "print(code, bad)\n"
    )
    result = run_python(code, "combine", *map(str, files), "-o", str(tmp_path / "avg.weights.h5"))
    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stderr


def test_a_thousand_inputs_work_with_few_file_descriptors(tmp_path):
    source = write_weights(
        tmp_path / "src.weights.h5", {"layers/a/vars/0": np.arange(6, dtype=np.float32)}
    )
    data = source.read_bytes()
    directory = tmp_path / "many"
    directory.mkdir()
    for i in range(1000):
        (directory / f"m_{i}.weights.h5").write_bytes(data)
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))\n"
        "from wavg.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "avg.weights.h5"
    files = sorted(map(str, directory.glob("m_*.weights.h5")))
    result = run_python(code, "combine", *files, "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.array_equal(read_weights(out)["layers/a/vars/0"], np.arange(6, dtype=np.float32))


def test_integer_weight_tensors_are_copied_from_the_newest_with_a_warning(tmp_path):
    # A lookup table, not a quantized kernel: an 8-bit matrix beside float scales would be
    # refused as quantized (tests/formats/test_quantized.py).
    files = []
    for i in range(3):
        files.append(
            write_weights(
                tmp_path / f"m_{i}.weights.h5",
                {
                    "layers/q/vars/0": np.full((4, 8), i, np.int64),
                    "layers/q/vars/1": np.full(8, float(i), np.float32),
                },
            )
        )
    out = tmp_path / "avg.weights.h5"
    summary = wavg.combine(files, out)
    got = read_weights(out)
    assert np.array_equal(got["layers/q/vars/0"], np.full((4, 8), 2, np.int64))
    assert np.array_equal(got["layers/q/vars/1"], np.full(8, 1.0, np.float32))
    copied = [w for w in summary.warnings if "copied" in w]
    assert len(copied) == 1 and "layers/q/vars/0 (int64)" in copied[0]


@pytest.mark.parametrize("fmt", ["h5", "keras"])
def test_outside_the_averaged_tensors_the_output_is_the_newest_file_byte_for_byte(
    runs, tmp_path, fmt
):
    import zipfile

    from wavg.formats.registry import open_checkpoint

    files = runs["conv_bn"].files[fmt]
    out = tmp_path / f"avg.{fmt}"
    wavg.combine(files, out, scheme="linear")
    newest = open_checkpoint(str(files[-1]))
    start, length = newest.weights_bytes()
    extents = [
        (t.offset - start, t.offset - start + t.nbytes)
        for t in newest.tensors.values()
        if t.averaged
    ]
    newest.close()
    if fmt == "keras":
        with zipfile.ZipFile(out) as archive:
            got = archive.read("model.weights.h5")
    else:
        got = out.read_bytes()
    want = files[-1].read_bytes()[start : start + length]
    assert len(got) == len(want)
    mask = np.ones(len(want), bool)
    for first, last in extents:
        mask[first:last] = False
    assert np.array_equal(np.frombuffer(got, np.uint8)[mask], np.frombuffer(want, np.uint8)[mask])
    assert not np.array_equal(
        np.frombuffer(got, np.uint8)[~mask], np.frombuffer(want, np.uint8)[~mask]
    )
