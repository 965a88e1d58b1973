"""Damaged, strange and changing inputs: one line naming the file, exit 1, nothing written.

Every test snapshots the sha256 and mtime of each input before the run and checks them
after: wavg never modifies an input, whatever it holds.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest
from support import safety as hs

import wavg
import wavg.storage.local
from wavg.errors import CheckpointError, CheckpointMismatch, InputChanged, NonFiniteValues
from wavg.storage.descriptors import OPEN_FILES


def refused(args, capfd, inputs, names, code=1) -> str:
    """Run the CLI in-process; assert the one-line refusal, no output and untouched inputs."""
    out = Path(args[args.index("-o") + 1])
    with hs.inputs_untouched(inputs):
        result = hs.run_cli(args, capfd)
    line = hs.assert_one_line_error(result, names, code)
    hs.assert_no_output(out)
    return line


FORMATS = {
    "h5": (lambda kf, s: s[-2:], ".h5", 53),
    "keras": (lambda kf, s: [kf / f"keras/model_{i}.keras" for i in (2, 3)], ".keras", 97),
    "weights.h5": (
        lambda kf, s: [kf / f"weights/model_{i}.weights.h5" for i in (2, 3)],
        ".weights.h5",
        97,
    ),
}


@pytest.mark.parametrize("position", ["newest", "older"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_truncated_file_is_refused_at_every_offset(fmt, position, kf, samples, tmp_path, capfd):
    pick, suffix, step = FORMATS[fmt]
    older, newest = pick(kf, samples)
    source = newest if position == "newest" else older
    data = source.read_bytes()
    # Every `step` bytes (superblock, metadata, data), plus the first and last few bytes.
    offsets = sorted(
        {*range(0, len(data), step if position == "newest" else step * 4), 1, 7, 8}
        | {len(data) - k for k in (1, 2, 8, 100)}
    )
    bad = tmp_path / f"model_9{suffix}" if position == "newest" else tmp_path / f"model_0{suffix}"
    inputs = [older, bad] if position == "newest" else [bad, newest]
    out = tmp_path / f"avg{suffix}"
    for offset in offsets:
        bad.write_bytes(data[:offset])
        refused(["combine", *inputs, "-o", out], capfd, inputs, [bad])
    assert len(offsets) > 40


def garbage(kind: str, size: int = 24_000) -> bytes:
    rng = np.random.default_rng(len(kind))
    if kind == "random":
        return rng.bytes(size)
    if kind == "zeros":
        return bytes(size)
    if kind == "hdf5_signature_then_random":
        return b"\x89HDF\r\n\x1a\n" + rng.bytes(size)
    if kind == "zip_signature_then_random":
        return b"PK\x03\x04" + rng.bytes(size)
    if kind == "empty":
        return b""
    if kind == "one_byte":
        return b"\x89"
    if kind == "text":
        return b"this is not a checkpoint\n" * 100
    raise AssertionError(kind)


KINDS = [
    "random",
    "zeros",
    "hdf5_signature_then_random",
    "zip_signature_then_random",
    "empty",
    "one_byte",
    "text",
]


@pytest.mark.parametrize("position", ["newest", "older"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_not_a_checkpoint_is_refused(kind, position, samples, tmp_path, capfd):
    bad = tmp_path / ("model_999.h5" if position == "newest" else "model_1.h5")
    bad.write_bytes(garbage(kind))
    inputs = [samples[-1], bad] if position == "newest" else [bad, samples[-1]]
    refused(["combine", *inputs, "-o", tmp_path / "avg.h5"], capfd, inputs, [bad])


def test_a_directory_is_refused(samples, tmp_path, capfd):
    bad = tmp_path / "model_999.h5"
    bad.mkdir()
    inputs = [samples[-1], bad]
    line = refused(["combine", *inputs, "-o", tmp_path / "avg.h5"], capfd, inputs, [bad])
    assert "directory" in line


def test_a_missing_file_and_a_dangling_symlink_are_refused(samples, tmp_path, capfd):
    for bad in (tmp_path / "model_998.h5", tmp_path / "model_999.h5"):
        if bad.name == "model_999.h5":
            bad.symlink_to(tmp_path / "nowhere.h5")
        inputs = [samples[-1], bad]
        line = refused(["combine", *inputs, "-o", tmp_path / "avg.h5"], capfd, inputs, [bad])
        assert "no such file" in line


def test_a_fifo_is_refused_without_hanging(samples, tmp_path):
    bad = tmp_path / "model_999.h5"
    os.mkfifo(bad)
    inputs = [samples[-1], bad]
    with hs.inputs_untouched(inputs):
        result = hs.run_wavg(["combine", *inputs, "-o", tmp_path / "avg.h5"], timeout=30)
    hs.assert_one_line_error(result, [bad, "not a regular file"])
    hs.assert_no_output(tmp_path / "avg.h5")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_a_device_is_refused_without_reading_it(device, samples, tmp_path):
    inputs = [samples[-1], Path(device)]
    with hs.inputs_untouched(inputs[:1]):
        result = hs.run_wavg(
            ["combine", "--order", "given", *inputs, "-o", tmp_path / "avg.h5"], timeout=30
        )
    hs.assert_one_line_error(result, [device, "not a regular file"])
    hs.assert_no_output(tmp_path / "avg.h5")


def test_an_unreadable_file_is_refused_as_permission_denied(samples, tmp_path):
    # Root reads any file, so the run drops root's permission-override capabilities.
    good = tmp_path / "model_1.h5"
    bad = tmp_path / "model_2.h5"
    shutil.copy(samples[-1], good)
    shutil.copy(samples[-2], bad)
    bad.chmod(0o000)
    before = {p: (hs.sha256(p), p.stat().st_mtime_ns) for p in (good, bad)}
    result = hs.run_wavg(["combine", good, bad, "-o", tmp_path / "avg.h5"], unprivileged=True)
    hs.assert_one_line_error(result, [bad, "permission denied"])
    hs.assert_no_output(tmp_path / "avg.h5")
    assert {p: (hs.sha256(p), p.stat().st_mtime_ns) for p in (good, bad)} == before


# ---------------------------------------------------------------------------------------------
# inputs that do not fit together


def test_mixed_formats_are_refused_naming_both_files(kf, samples, tmp_path, capfd):
    pairs = [
        (samples[-1], kf / "keras/model_3.keras"),
        (kf / "keras/model_2.keras", kf / "weights/model_3.weights.h5"),
        (kf / "weights/model_2.weights.h5", samples[-1]),
    ]
    for older, newest in pairs:
        inputs = [older, newest]
        out = tmp_path / (
            "avg" + ("".join(newest.suffixes[-2:]) if "weights" in newest.name else newest.suffix)
        )
        line = refused(
            ["combine", "--order", "given", *inputs, "-o", out], capfd, inputs, [older, newest]
        )
        assert "format" in line


def test_a_different_architecture_is_refused_naming_the_tensor_and_both_files(kf, tmp_path, capfd):
    for suffix in (".keras", ".weights.h5"):
        folder = "keras" if suffix == ".keras" else "weights"
        older, newest = kf / f"wide/model_4{suffix}", kf / f"{folder}/model_3{suffix}"
        inputs = [older, newest]
        line = refused(
            ["combine", "--order", "given", *inputs, "-o", tmp_path / f"avg{suffix}"],
            capfd,
            inputs,
            [older, newest, "shape"],
        )
        assert "layers/dense" in line


def rewrite(path: Path, edit) -> None:
    with h5py.File(path, "r+") as h5:
        names = []
        h5.visititems(
            lambda n, o: (
                names.append(n)
                if isinstance(o, h5py.Dataset)
                and n.startswith("model_weights/")
                and n.endswith("kernel")
                else None
            )
        )
        edit(h5, names[0])


def test_a_different_dtype_is_refused_naming_the_tensor(samples, tmp_path, capfd):
    bad = tmp_path / "model_1.h5"
    shutil.copy(samples[0], bad)
    name = []

    def to_float16(h5, tensor):
        data = h5[tensor][()]
        del h5[tensor]
        h5.create_dataset(tensor, data=data.astype("f2"))
        name.append(tensor)

    rewrite(bad, to_float16)
    inputs = [bad, samples[-1]]
    line = refused(["combine", *inputs, "-o", tmp_path / "avg.h5"], capfd, inputs, [bad])
    assert name[0] in line and "float16" in line and str(samples[-1]) in line


@pytest.mark.parametrize("where", ["older_lacks", "older_has_extra"])
def test_a_missing_or_extra_tensor_is_refused_naming_it_and_both_files(
    where, samples, tmp_path, capfd
):
    bad = tmp_path / "model_1.h5"
    shutil.copy(samples[0], bad)
    name = []

    def edit(h5, tensor):
        if where == "older_lacks":
            del h5[tensor]
            name.append(tensor)
        else:
            h5.create_dataset(tensor + "_extra", data=np.ones(3, "f4"))
            name.append(tensor + "_extra")

    rewrite(bad, edit)
    inputs = [bad, samples[-1]]
    with pytest.raises(CheckpointMismatch):
        wavg.combine(inputs, tmp_path / "avg.h5")
    refused(
        ["combine", *inputs, "-o", tmp_path / "avg.h5"],
        capfd,
        inputs,
        [bad, samples[-1], name[0]],
    )


# ---------------------------------------------------------------------------------------------
# non-finite values


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_weight_is_refused_naming_the_file_and_tensor(value, samples, tmp_path, capfd):
    bad = tmp_path / "model_495.h5"
    shutil.copy(samples[5], bad)
    name = []

    def poison(h5, tensor):
        data = h5[tensor][()]
        data.flat[3] = value
        h5[tensor][...] = data
        name.append(tensor)

    rewrite(bad, poison)
    inputs = [*samples[3:5], bad, *samples[6:]]
    out = tmp_path / "avg.h5"
    line = refused(["combine", *inputs, "-o", out], capfd, inputs, [bad, name[0]])
    assert "--allow-nonfinite" in line
    with pytest.raises(NonFiniteValues):
        wavg.combine(inputs, out)
    hs.assert_no_output(out)
    # Allowed: the output is written and holds the non-finite value where it was.
    with hs.inputs_untouched(inputs):
        result = hs.run_cli(["combine", "--allow-nonfinite", *inputs, "-o", out], capfd)
    assert result.code == 0, result.stderr
    averaged = hs.h5_tensors(out)[name[0]]
    assert not np.isfinite(averaged.flat[3])
    assert np.isfinite(np.delete(averaged.ravel(), 3)).all()


def test_a_non_finite_optimizer_value_is_copied_not_refused(samples, tmp_path):
    bad = tmp_path / "model_499.h5"
    shutil.copy(samples[-1], bad)
    with h5py.File(bad, "r+") as h5:
        names = []
        h5["optimizer_weights"].visititems(
            lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.shape else None
        )
        dset = h5["optimizer_weights"][names[0]]
        data = dset[()]
        data.flat[0] = np.nan
        dset[...] = data
    inputs = [samples[-2], bad]
    with hs.inputs_untouched(inputs):
        wavg.combine(inputs, tmp_path / "avg.h5")
    hs.assert_is_average(tmp_path / "avg.h5", inputs)


# ---------------------------------------------------------------------------------------------
# inputs that change while they are read


def modify(path: Path, how: str) -> None:
    if how == "append":
        with open(path, "ab") as f:
            f.write(b"\0" * 64)
    elif how == "rewrite_in_place":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        with open(path, "r+b") as f:
            f.write(data)
    elif how == "replace":
        tmp = path.with_suffix(".new")
        shutil.copy(path, tmp)
        os.replace(tmp, path)
    elif how == "delete":
        path.unlink()
    else:
        raise AssertionError(how)


HOWS = ["append", "rewrite_in_place", "replace", "delete"]


@pytest.mark.parametrize("keep_open", [True, False], ids=["descriptors_kept", "reopened"])
@pytest.mark.parametrize("how", HOWS)
def test_an_input_that_changes_during_the_run_is_refused(
    how, keep_open, samples, tmp_path, monkeypatch
):
    inputs = []
    for src in samples[-3:]:
        shutil.copy(src, tmp_path / src.name)
        inputs.append(tmp_path / src.name)
    victim = inputs[0]
    if not keep_open:  # as with more inputs than descriptors kept open: reopened per read
        monkeypatch.setattr(OPEN_FILES, "_left", 0)
    calls = []

    def progress(done: int, total: int) -> None:
        if not calls:
            modify(victim, how)
        calls.append(done)

    out = tmp_path / "avg.h5"
    with hs.inputs_untouched(inputs[1:]), pytest.raises(InputChanged) as info:
        wavg.combine(inputs, out, progress=progress)
    assert str(victim) in str(info.value)
    assert "\n" not in str(info.value)
    hs.assert_no_output(out)


def test_an_input_changed_under_the_cli_is_one_line_naming_it(
    samples, tmp_path, capfd, monkeypatch
):
    inputs = []
    for src in samples[-3:]:
        shutil.copy(src, tmp_path / src.name)
        inputs.append(tmp_path / src.name)
    victim = inputs[1]
    calls = []

    def grow_after(real):
        def read_then_grow(self, offset, buffers):
            got = real(self, offset, buffers)
            if not calls:  # a training job appends to the file mid-run
                with open(victim, "ab") as f:
                    f.write(b"more")
            calls.append(offset)
            return got

        return read_then_grow

    # Tensor bytes are read with readinto (one block) or readv (a batch of small tensors).
    for method in ("readinto", "readv"):
        real = getattr(wavg.storage.local.InputFile, method)
        monkeypatch.setattr(wavg.storage.local.InputFile, method, grow_after(real))
    with hs.inputs_untouched([inputs[0], inputs[2]]):
        result = hs.run_cli(["combine", *inputs, "-o", tmp_path / "avg.h5"], capfd)
    hs.assert_one_line_error(result, [victim, "changed"])
    hs.assert_no_output(tmp_path / "avg.h5")


def test_a_compressed_input_that_changes_is_refused_too(kf, tmp_path):
    import zipfile

    inputs = []
    for i in (2, 3):
        path = tmp_path / f"model_{i}.keras"
        with (
            zipfile.ZipFile(kf / f"keras/model_{i}.keras") as src,
            zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst,
        ):
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info))
        inputs.append(path)
    calls = []

    def progress(done, total):
        if not calls:
            modify(inputs[0], "append")
        calls.append(done)

    with pytest.raises((InputChanged, CheckpointError)) as info:
        wavg.combine(inputs, tmp_path / "avg.keras", progress=progress)
    assert str(inputs[0]) in str(info.value)
    hs.assert_no_output(tmp_path / "avg.keras")


def test_the_permission_bits_of_inputs_are_not_required_to_be_writable(samples, tmp_path):
    inputs = []
    for src in samples[-2:]:
        shutil.copy(src, tmp_path / src.name)
        (tmp_path / src.name).chmod(stat.S_IRUSR)
        inputs.append(tmp_path / src.name)
    with hs.inputs_untouched(inputs):
        wavg.combine(inputs, tmp_path / "avg.h5")
    hs.assert_is_average(tmp_path / "avg.h5", inputs)
    assert all(stat.S_IMODE(p.stat().st_mode) == stat.S_IRUSR for p in inputs)


def test_a_keras_input_refused_while_writing_leaves_no_traceback(kf, tmp_path):
    # The archive writer used to leave a zip member open: Python then printed a traceback
    # from ZipFile.__del__ after the one-line error.
    import zipfile

    bad = tmp_path / "model_3.keras"
    with zipfile.ZipFile(kf / "keras/model_3.keras") as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    weights = tmp_path / "weights.h5"
    weights.write_bytes(dict((i.filename, d) for i, d in members)["model.weights.h5"])
    with h5py.File(weights, "r+") as h5:
        data = h5["layers/dense/vars/0"][()]
        data.flat[0] = np.nan
        h5["layers/dense/vars/0"][...] = data
    with zipfile.ZipFile(bad, "w") as archive:
        for info, content in members:
            if info.filename == "model.weights.h5":
                content = weights.read_bytes()
            archive.writestr(info, content)
    inputs = [kf / "keras/model_2.keras", bad]
    out = tmp_path / "avg.keras"
    with hs.inputs_untouched(inputs):
        result = hs.run_wavg(["combine", *inputs, "-o", out])
    hs.assert_one_line_error(result, [bad, "layers/dense/vars/0", "NaN"])
    assert "Exception ignored" not in result.stderr
    hs.assert_no_output(out)


def test_a_float_tensor_in_a_non_ieee_format_is_refused_not_misread(samples, tmp_path, capfd):
    # h5py calls a 32-bit float with a 21-bit mantissa float32; its raw bytes are not IEEE,
    # so averaging them as float32 gave wrong values (found by the fuzzer).
    bad = tmp_path / "model_499.h5"
    shutil.copy(samples[-1], bad)
    name = []

    def odd_float(h5, tensor):
        data = h5[tensor][()]
        ftype = h5py.h5t.IEEE_F32LE.copy()
        ftype.set_fields(31, 23, 8, 0, 21)
        del h5[tensor]
        space = h5py.h5s.create_simple(data.shape)
        dset = h5py.h5d.create(h5.id, tensor.encode(), ftype, space)
        dset.write(h5py.h5s.ALL, h5py.h5s.ALL, data)
        name.append(tensor)

    rewrite(bad, odd_float)
    assert h5py.File(bad, "r")[name[0]].dtype == np.float32
    inputs = [samples[-2], bad]
    line = refused(["combine", *inputs, "-o", tmp_path / "avg.h5"], capfd, inputs, [bad, name[0]])
    assert "non-IEEE" in line
