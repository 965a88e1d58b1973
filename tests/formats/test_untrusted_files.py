"""Untrusted checkpoints: nothing outside the file is read, no bomb goes off, no code runs.

Each hazard is built into a real checkpoint (a Keras-made file, edited with h5py or zipfile)
and must be refused with one line naming the file, before any data is read. Targets outside
the file are FIFOs with no writer: had wavg opened one, the run would block until timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from support import safety as hs

import wavg
from wavg.errors import CheckpointError, UnsafeCheckpoint

HAZARDS = ["external_link", "soft_link", "virtual_dataset", "external_storage", "cycle", "alias"]
EXPECTED = {
    "external_link": "external link",
    "soft_link": "soft link",
    "virtual_dataset": "virtual dataset",
    "external_storage": "external files",
    "cycle": "seen before",
    "alias": "seen before",
}


def last_two(fmt: str, kf: Path, samples: list[Path]) -> tuple[Path, Path]:
    """The two newest checkpoints of one format: (older, newest)."""
    if fmt == "h5":
        return samples[-2], samples[-1]
    if fmt == "keras":
        return kf / "keras/model_2.keras", kf / "keras/model_3.keras"
    return kf / "weights/model_2.weights.h5", kf / "weights/model_3.weights.h5"


def add_hazard(h5: h5py.File, kind: str, fifo: Path) -> str:
    """Add one object that reaches outside the file (or loops) next to the first tensor."""
    first = []
    h5.visititems(lambda n, o: first.append(n) if isinstance(o, h5py.Dataset) else None)
    group = h5[first[0].rsplit("/", 1)[0]] if "/" in first[0] else h5
    if kind == "external_link":
        group["evil"] = h5py.ExternalLink(str(fifo), "/data")
    elif kind == "soft_link":
        group["evil"] = h5py.SoftLink("/" + first[-1])
    elif kind == "virtual_dataset":
        layout = h5py.VirtualLayout(shape=(10,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(fifo), "data", shape=(10,))
        group.create_virtual_dataset("evil", layout)
    elif kind == "external_storage":
        group.create_dataset("evil", shape=(10,), dtype="f4", external=[(str(fifo), 0, 40)])
    elif kind == "cycle":
        group["evil"] = h5["/"]
    elif kind == "alias":
        group["evil"] = h5[first[-1]]
    return f"{group.name.lstrip('/')}/evil".lstrip("/")


def rezip(src: Path, dst: Path, *, replace=None, extra=(), compression=None) -> None:
    """Copy a .keras archive member by member, replacing or adding members."""
    replace = replace or {}
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(dst, "w") as out:
        for info in archive.infolist():
            data = replace.get(info.filename, archive.read(info))
            if data is None:
                continue
            new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            new.compress_type = info.compress_type if compression is None else compression
            out.writestr(new, data)
        for name, data, kind in extra:
            new = zipfile.ZipInfo(name)
            new.compress_type = kind
            out.writestr(new, data)


def hazardous_copy(kind, fmt, kf, samples, tmp_path) -> tuple[list[Path], Path, str]:
    """Two inputs of format `fmt`, the newest carrying the hazard; returns (inputs, bad, object)."""
    fifo = tmp_path / "outside"
    os.mkfifo(fifo)
    older, newest = last_two(fmt, kf, samples)
    bad = tmp_path / newest.name
    if fmt == "keras":
        with zipfile.ZipFile(newest) as archive:
            weights = tmp_path / "w.h5"
            weights.write_bytes(archive.read("model.weights.h5"))
        with h5py.File(weights, "r+") as h5:
            name = add_hazard(h5, kind, fifo)
        rezip(newest, bad, replace={"model.weights.h5": weights.read_bytes()})
        weights.unlink()
    else:
        shutil.copy(newest, bad)
        with h5py.File(bad, "r+") as h5:
            name = add_hazard(h5, kind, fifo)
    return [older, bad], bad, name


@pytest.mark.parametrize("fmt", ["h5", "weights.h5", "keras"])
@pytest.mark.parametrize("kind", HAZARDS)
def test_objects_that_reach_outside_the_file_are_refused_before_any_read(
    kind, fmt, kf, samples, tmp_path
):
    inputs, bad, name = hazardous_copy(kind, fmt, kf, samples, tmp_path)
    out = tmp_path / ("avg" + ("." + fmt if fmt != "h5" else ".h5"))
    with hs.inputs_untouched(inputs):
        # Reading the FIFO would block: the timeout is the proof that it was never opened.
        result = hs.run_wavg(["combine", *inputs, "-o", out], timeout=30)
    line = hs.assert_one_line_error(result, [bad, EXPECTED[kind]])
    if kind != "alias":
        assert "evil" in line
    hs.assert_no_output(out)


@pytest.mark.parametrize("kind", HAZARDS)
def test_a_hazard_in_an_older_input_is_refused_too(kind, kf, samples, tmp_path):
    inputs, bad, _ = hazardous_copy(kind, "h5", kf, samples, tmp_path)
    older = tmp_path / "model_400.h5"
    bad.rename(older)
    inputs = [older, samples[-1]]
    with hs.inputs_untouched(inputs), pytest.raises(UnsafeCheckpoint) as info:
        wavg.combine(inputs, tmp_path / "avg.h5")
    assert str(older) in str(info.value) and EXPECTED[kind] in str(info.value)
    hs.assert_no_output(tmp_path / "avg.h5")


# ---------------------------------------------------------------------------------------------
# .keras archives


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "/abs", "assets/../../x", "C:/x"])
def test_archive_entries_that_escape_the_archive_are_refused(name, kf, tmp_path):
    bad = tmp_path / "model_3.keras"
    rezip(kf / "keras/model_3.keras", bad, extra=[(name, b"payload", zipfile.ZIP_STORED)])
    inputs = [kf / "keras/model_2.keras", bad]
    with hs.inputs_untouched(inputs), pytest.raises(UnsafeCheckpoint) as info:
        wavg.combine(inputs, tmp_path / "avg.keras")
    assert str(bad) in str(info.value) and "outside the archive" in str(info.value)
    hs.assert_no_output(tmp_path / "avg.keras")
    assert not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("member", ["config.json", "model.weights.h5"])
def test_archive_entries_that_appear_twice_are_refused(member, kf, tmp_path, capfd):
    src = kf / "keras/model_3.keras"
    bad = tmp_path / "model_3.keras"
    with zipfile.ZipFile(src) as archive:
        data = archive.read(member)
    with pytest.warns(UserWarning, match="Duplicate name"):
        rezip(src, bad, extra=[(member, data, zipfile.ZIP_STORED)])
    inputs = [kf / "keras/model_2.keras", bad]
    with hs.inputs_untouched(inputs):
        result = hs.run_cli(["combine", *inputs, "-o", tmp_path / "avg.keras"], capfd)
    hs.assert_one_line_error(result, [bad, "appears twice"])
    hs.assert_no_output(tmp_path / "avg.keras")


def patch_declared_size(path: Path, member: str, size: int) -> None:
    """Set a member's uncompressed size in both its local and central headers."""
    data = bytearray(path.read_bytes())
    encoded = member.encode()
    for signature, size_at, name_at in ((b"PK\x01\x02", 24, 46), (b"PK\x03\x04", 22, 30)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_at : start + name_at + len(encoded)] == encoded:
                data[start + size_at : start + size_at + 4] = struct.pack("<I", size)
            start += 4
    path.write_bytes(bytes(data))


def test_a_highly_compressed_archive_member_is_refused_as_a_zip_bomb(kf, tmp_path):
    bad = tmp_path / "model_3.keras"
    zeros = bytes(64 << 20)  # 64 MB of zeros deflate to ~64 KB
    rezip(kf / "keras/model_3.keras", bad, extra=[("assets/blob", zeros, zipfile.ZIP_DEFLATED)])
    assert bad.stat().st_size < 1 << 20
    inputs = [kf / "keras/model_2.keras", bad]
    started = time.perf_counter()
    with hs.inputs_untouched(inputs), pytest.raises(UnsafeCheckpoint) as info:
        wavg.combine(inputs, tmp_path / "avg.keras")
    assert time.perf_counter() - started < 5
    assert str(bad) in str(info.value) and "zip bomb" in str(info.value)


@pytest.mark.parametrize("member", ["config.json", "model.weights.h5"])
def test_an_absurd_declared_member_size_is_refused(member, kf, tmp_path, capfd):
    bad = tmp_path / "model_3.keras"
    rezip(kf / "keras/model_3.keras", bad, compression=zipfile.ZIP_DEFLATED)
    patch_declared_size(bad, member, 0xFFFF0000)
    inputs = [kf / "keras/model_2.keras", bad]
    with hs.inputs_untouched(inputs):
        result = hs.run_cli(["combine", *inputs, "-o", tmp_path / "avg.keras"], capfd)
    hs.assert_one_line_error(result, [bad, member, "zip bomb"])
    hs.assert_no_output(tmp_path / "avg.keras")


def test_a_stored_member_whose_sizes_disagree_is_refused(kf, tmp_path, capfd):
    bad = tmp_path / "model_3.keras"
    shutil.copy(kf / "keras/model_3.keras", bad)
    patch_declared_size(bad, "model.weights.h5", 1 << 30)
    inputs = [kf / "keras/model_2.keras", bad]
    with hs.inputs_untouched(inputs):
        result = hs.run_cli(["combine", *inputs, "-o", tmp_path / "avg.keras"], capfd)
    hs.assert_one_line_error(result, [bad, "model.weights.h5"])
    hs.assert_no_output(tmp_path / "avg.keras")


def test_an_archive_without_model_weights_is_refused(kf, tmp_path, capfd):
    bad = tmp_path / "model_3.keras"
    rezip(kf / "keras/model_3.keras", bad, replace={"model.weights.h5": None})
    inputs = [kf / "keras/model_2.keras", bad]
    with hs.inputs_untouched(inputs):
        result = hs.run_cli(["combine", *inputs, "-o", tmp_path / "avg.keras"], capfd)
    hs.assert_one_line_error(result, [bad, "no model.weights.h5"])
    hs.assert_no_output(tmp_path / "avg.keras")


def test_a_deflated_model_weights_member_is_still_averaged_correctly(kf, tmp_path):
    inputs = []
    for i in (1, 2, 3):
        path = tmp_path / f"model_{i}.keras"
        rezip(kf / f"keras/model_{i}.keras", path, compression=zipfile.ZIP_DEFLATED)
        inputs.append(path)
    out = tmp_path / "avg.keras"
    with hs.inputs_untouched(inputs):
        summary = wavg.combine(inputs, out, weights=[1, 2, 3])
    assert summary.tensors == 4
    hs.assert_is_average(out, inputs, [1, 2, 3])
    # The same as averaging the stored originals.
    hs.assert_is_average(out, [kf / f"keras/model_{i}.keras" for i in (1, 2, 3)], [1, 2, 3])
    with zipfile.ZipFile(out) as archive, zipfile.ZipFile(inputs[-1]) as newest:
        assert archive.read("config.json") == newest.read("config.json")


# ---------------------------------------------------------------------------------------------
# resource bombs


# Peak memory is the child's own VmHWM, read by the child as it exits: ru_maxrss (wait4)
# would include this test process's memory, which Linux folds into a child's at exec.
_MEASURED_WAVG = """
import atexit, sys

def report(path=sys.argv[1]):
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(peak)

atexit.register(report)
from wavg.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_measured(args: list, timeout: float = 60) -> tuple[hs.Result, float, int]:
    """Run the CLI in a subprocess; return its result, wall seconds and peak RSS in MB."""
    with tempfile.NamedTemporaryFile("r") as peak:
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _MEASURED_WAVG, peak.name, *map(str, args)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"wavg still running after {timeout} s") from None
        seconds = time.perf_counter() - started
        peak_kb = int(peak.read() or 0)
    result = hs.Result(proc.returncode, proc.stdout, proc.stderr)
    return result, seconds, peak_kb // 1024


def first_group(h5: h5py.File) -> h5py.Group:
    """The group holding the first model weight (layer names vary between Keras runs)."""
    names = []
    h5.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return h5[names[0].rsplit("/", 1)[0]]


def bomb_copies(samples: list[Path], tmp_path: Path, build) -> list[Path]:
    inputs = []
    for src in samples[-2:]:
        path = tmp_path / src.name
        shutil.copy(src, path)
        with h5py.File(path, "r+") as h5:
            build(first_group(h5))
        inputs.append(path)
    return inputs


@pytest.mark.parametrize(
    "build",
    [
        # One tensor of 10 GB of fill value in a file of 24 KB.
        lambda g: g.create_dataset(
            "evil", shape=(50000, 50000), dtype="f4", chunks=(1000, 1000), compression="gzip"
        ),
        # A hundred tensors of 15.6 MB each, every one under the per-tensor floor.
        lambda g: [
            g.create_dataset(
                f"evil{i}", shape=(3900, 1000), dtype="f4", chunks=(1000, 1000), compression="gzip"
            )
            for i in range(100)
        ],
        # Uncompressed but chunked, nothing stored.
        lambda g: g.create_dataset("evil", shape=(1 << 20, 1 << 10), dtype="f8", chunks=True),
    ],
    ids=["one_huge_tensor", "many_tensors_under_the_floor", "chunked_uncompressed"],
)
def test_a_fill_value_bomb_is_refused_quickly_in_bounded_memory(build, samples, tmp_path):
    inputs = bomb_copies(samples, tmp_path, build)
    assert all(p.stat().st_size < 1 << 20 for p in inputs)
    out = tmp_path / "avg.h5"
    with hs.inputs_untouched(inputs):
        result, seconds, peak_mb = run_measured(["combine", *inputs, "-o", out])
    hs.assert_one_line_error(result, [inputs[0], "decompression bomb"])
    assert seconds < 15, seconds
    assert peak_mb < 400, peak_mb
    hs.assert_no_output(out)


def test_an_enormous_contiguous_tensor_without_stored_bytes_is_refused(samples, tmp_path, capfd):
    inputs = bomb_copies(
        samples, tmp_path, lambda g: g.create_dataset("evil", shape=(50000, 50000), dtype="f4")
    )
    with hs.inputs_untouched(inputs):
        result = hs.run_cli(["combine", *inputs, "-o", tmp_path / "avg.h5"], capfd)
    hs.assert_one_line_error(result, [inputs[0], "evil", "no stored data"])
    hs.assert_no_output(tmp_path / "avg.h5")


def test_a_tensor_whose_data_lies_past_the_end_of_the_file_is_refused(samples, tmp_path, capfd):
    inputs = bomb_copies(
        samples, tmp_path, lambda g: g.create_dataset("evil", data=np.ones(1 << 20, dtype="f4"))
    )
    bad = inputs[0]
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size - (1 << 19))
    with hs.inputs_untouched(inputs):
        result = hs.run_cli(["combine", *inputs, "-o", tmp_path / "avg.h5"], capfd)
    hs.assert_one_line_error(result, [bad])
    hs.assert_no_output(tmp_path / "avg.h5")


def test_thousands_of_tiny_tensors_are_averaged_in_bounded_time(samples, tmp_path):
    rng = np.random.default_rng(0)

    def build(group):
        for i in range(3000):
            group.create_dataset(f"t{i}", data=rng.standard_normal(4).astype("f4"))

    inputs = bomb_copies(samples, tmp_path, build)
    out = tmp_path / "avg.h5"
    started = time.perf_counter()
    with hs.inputs_untouched(inputs):
        summary = wavg.combine(inputs, out)
    assert time.perf_counter() - started < 30
    assert summary.tensors == 3004
    hs.assert_is_average(out, inputs)


# ---------------------------------------------------------------------------------------------
# code in configs


COMBINE_IN_A_FRESH_PROCESS = """
import json, sys
import wavg
summary = wavg.combine(sys.argv[1:-1], sys.argv[-1])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "tensorflow", "tf_keras"))
print(json.dumps({"tensors": summary.tensors, "loaded": loaded}))
"""


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_combine_averages_code_carrying_checkpoints_without_running_or_importing_anything(
    suffix, kf, tmp_path
):
    marker = Path(hs.manifest(kf)["marker"])
    assert hs.manifest(kf)["payload_runs_when_loaded_unsafely"]["model_1.keras"] is True
    inputs = [kf / f"code/model_{i}{suffix}" for i in (1, 2)]
    config = (
        zipfile.ZipFile(inputs[-1]).read("config.json").decode()
        if suffix == ".keras"
        else h5py.File(inputs[-1], "r").attrs["model_config"]
    )
    assert '"__lambda__"' in config and '"system"' in config and str(marker) in config
    out = tmp_path / f"avg{suffix}"
    with hs.inputs_untouched(inputs):
        proc = subprocess.run(
            [sys.executable, "-c", COMBINE_IN_A_FRESH_PROCESS, *map(str, inputs), str(out)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["loaded"] == []
    assert report["tensors"] == 4
    assert not marker.exists()
    hs.assert_is_average(out, inputs)
    if suffix == ".keras":
        with zipfile.ZipFile(out) as archive:
            assert archive.read("config.json").decode() == config
    else:
        with h5py.File(out, "r") as h5:
            assert h5.attrs["model_config"] == config


def test_reading_checkpoints_with_the_library_never_imports_keras(kf):
    code = (
        "import sys, wavg.formats.registry as c\n"
        "for p in sys.argv[1:]: c.open_checkpoint(p).close()\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow')]\n"
    )
    paths = [kf / "code/model_1.keras", kf / "code/model_1.h5", kf / "weights/model_1.weights.h5"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_a_weights_member_that_is_not_hdf5_is_a_checkpoint_error(kf, tmp_path):
    bad = tmp_path / "model_3.keras"
    rezip(kf / "keras/model_3.keras", bad, replace={"model.weights.h5": b"not hdf5" * 100})
    with pytest.raises(CheckpointError) as info:
        wavg.combine([kf / "keras/model_2.keras", bad], tmp_path / "avg.keras")
    assert str(bad) in str(info.value)
    hs.assert_no_output(tmp_path / "avg.keras")


def zero_free_space_of_global_heap(path: Path) -> int:
    """Set the size of the free-space object of the file's first global heap to 0."""
    data = bytearray(path.read_bytes())
    at = data.find(b"GCOL")
    assert at >= 0 and data[at + 4] == 1
    size = int.from_bytes(data[at + 8 : at + 16], "little")
    p = at + 16
    while p < at + size:
        index = int.from_bytes(data[p : p + 2], "little")
        length = int.from_bytes(data[p + 8 : p + 16], "little")
        if index == 0:
            data[p + 8 : p + 16] = bytes(8)
            break
        p += 16 + (length + 7) // 8 * 8
    path.write_bytes(bytes(data))
    return at


@pytest.mark.parametrize("fmt", ["h5", "keras", "weights.h5"])
def test_a_global_heap_that_would_hang_libhdf5_is_refused(fmt, kf, samples, tmp_path):
    # libhdf5 loops forever (in C: not even Ctrl-C stops it) on a free-space object of size 0
    # in a global heap collection, where Keras keeps its string attributes.
    older, newest = last_two(fmt, kf, samples)
    bad = tmp_path / newest.name
    if fmt == "keras":
        weights = tmp_path / "w.h5"
        with zipfile.ZipFile(newest) as archive:
            weights.write_bytes(archive.read("model.weights.h5"))
        zero_free_space_of_global_heap(weights)
        rezip(newest, bad, replace={"model.weights.h5": weights.read_bytes()})
    else:
        shutil.copy(newest, bad)
        zero_free_space_of_global_heap(bad)
    inputs = [older, bad]
    out = tmp_path / ("avg" + ("." + fmt if fmt != "h5" else ".h5"))
    with hs.inputs_untouched(inputs):
        result = hs.run_wavg(["combine", *inputs, "-o", out], timeout=60)
    hs.assert_one_line_error(result, [bad, "global heap"])
    hs.assert_no_output(out)


@pytest.mark.parametrize("damage", ["deflate_stream", "local_header_name"])
def test_a_damaged_deflated_weights_member_is_one_line_naming_the_archive(
    damage, kf, tmp_path, capfd
):
    # zlib.error and BadZipFile from the decompressing stream used to escape as tracebacks.
    inputs = []
    for i in (2, 3):
        path = tmp_path / f"model_{i}.keras"
        rezip(kf / f"keras/model_{i}.keras", path, compression=zipfile.ZIP_DEFLATED)
        inputs.append(path)
    bad = inputs[1]
    data = bytearray(bad.read_bytes())
    with zipfile.ZipFile(bad) as archive:
        info = archive.getinfo("model.weights.h5")
    name_at = info.header_offset + 30
    if damage == "deflate_stream":
        start = name_at + len(info.filename) + len(info.extra)
        middle = start + info.compress_size // 2
        data[middle : middle + 64] = b"\xff" * 64
    else:
        data[name_at + len(info.filename) - 1] ^= 0x01
    bad.write_bytes(bytes(data))
    with hs.inputs_untouched(inputs):
        result = hs.run_cli(["combine", *inputs, "-o", tmp_path / "avg.keras"], capfd)
    hs.assert_one_line_error(result, [bad])
    hs.assert_no_output(tmp_path / "avg.keras")
