"""Hypothesis-driven mutation fuzzing of the readers and `wavg.combine`, in this process.

The mutations and the judge are those of ``scripts/fuzz.py`` (the long run, with crash
isolation): one of two inputs is damaged (bytes flipped, overwritten, inserted, deleted or
truncated; HDF5 attributes and datasets edited; inside a .keras archive or its weights) and
the only allowed outcomes are a correct average (checked against plain h5py) or a one-line
`WavgError` with no output and no temporary file left. Every case has a time limit.

``WAVG_FUZZ_EXAMPLES`` sets the examples per test (default 200: about 30 s in all).
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import safety as hs

sys.path.insert(0, str(hs.ROOT / "scripts"))
import fuzz  # noqa: E402

CASE_SECONDS = 20
settings.register_profile(
    "wavg-fuzz",
    max_examples=int(os.environ.get("WAVG_FUZZ_EXAMPLES", "200")),
    deadline=None,
    derandomize=True,  # make test is reproducible; scripts/fuzz.py explores at random
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("wavg-fuzz")


@pytest.fixture(scope="session")
def seeds(tmp_path_factory) -> Path:
    keras_dir = hs.keras_fixtures(tmp_path_factory)
    h5_dir = hs.samples(tmp_path_factory)[0].parent
    return fuzz.make_seeds(tmp_path_factory.mktemp("fuzz_seeds"), keras_dir, h5_dir)


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_work") / "case"


offsets = st.one_of(st.integers(0, 4095), st.integers(0, 1 << 20))
byte_op = st.one_of(
    st.tuples(st.just("flip"), offsets, st.sampled_from([1 << i for i in range(8)])),
    st.tuples(st.just("set"), offsets, st.integers(0, 255)),
    st.tuples(
        st.sampled_from(["overwrite", "insert"]),
        offsets,
        st.binary(min_size=1, max_size=48).map(bytes.hex),
    ),
    st.tuples(st.just("delete"), offsets, st.integers(1, 256)),
    st.tuples(st.just("truncate"), offsets, st.just(0)),
    st.tuples(st.just("interesting"), offsets, st.integers(0, len(fuzz.INTERESTING) - 1)),
)
h5_op = st.tuples(st.sampled_from(fuzz.H5_OPS), st.integers(0, 1 << 16), st.integers(0, 1 << 16))


def cases(kind: str, ops=None):
    return st.fixed_dictionaries(
        {
            "kind": st.just(kind),
            "deflate": st.booleans() if kind == "keras" else st.just(False),
            "layer": st.sampled_from(["outer", "inner"] if kind == "keras" else ["outer"]),
            "target": st.sampled_from(["newest", "older"]),
            "ops": st.lists(
                st.one_of(byte_op, byte_op, h5_op) if ops is None else ops, min_size=1, max_size=4
            ).map(lambda ops: [list(op) for op in ops]),
            "allow_nonfinite": st.booleans(),
        }
    )


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise CaseTimeout(f"case still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    # A loop inside libhdf5 never returns to Python, so SIGALRM cannot end it: then dump the
    # stacks and end the session rather than hang it (scripts/fuzz.py isolates such cases).
    faulthandler.dump_traceback_later(seconds * 3, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


ALLOWED = ("ok", "ok-unverified", "refused:", "skipped")


def fuzz_format(kind: str, seeds: Path, work: Path, ops=None, share=1.0) -> collections.Counter:
    seen: collections.Counter[str] = collections.Counter()

    @settings(FUZZ, max_examples=max(10, int(FUZZ.max_examples * share)))
    @given(case=cases(kind, ops))
    def one(case):
        with time_limit(CASE_SECONDS):
            result = fuzz.run_case(case, seeds, work)
        seen[result["outcome"].split(":")[0]] += 1
        assert result["outcome"].startswith(ALLOWED), result

    one()
    return seen


@pytest.mark.parametrize("kind", fuzz.SEED_KINDS)
def test_mutated_checkpoints_are_averaged_correctly_or_refused_in_one_line(kind, seeds, work):
    seen = fuzz_format(kind, seeds, work)
    # The mutations must exercise both outcomes, not just break every file.
    assert seen["refused"] > 0 and seen["ok"] + seen["ok-unverified"] > 0, seen
    assert seen["skipped"] < sum(seen.values()) / 2, seen


def test_edited_hdf5_attributes_and_datasets_are_averaged_or_refused(seeds, work):
    ops = st.one_of(h5_op)
    seen = collections.Counter()
    for kind in fuzz.SEED_KINDS:
        seen.update(fuzz_format(kind, seeds, work, ops, share=1 / 3))
    assert seen["refused"] > 0 and seen["ok"] > 0, seen


def test_the_judge_accepts_an_untouched_pair_and_catches_a_wrong_average(seeds, work):
    for kind in fuzz.SEED_KINDS:
        case = {"kind": kind, "layer": "outer", "target": "newest", "ops": []}
        assert fuzz.run_case({**case, "allow_nonfinite": False}, seeds, work)["outcome"] == "ok"
    out = work / "avg.weights.h5"
    inputs = sorted(work.glob("model_*"))
    assert len(inputs) == 2
    import wavg

    wavg.combine(inputs, out, weights=[1, 3], order="given")  # not the plain mean
    assert fuzz.check_success(out, inputs).startswith("wrong average")


# Cases the fuzzer found (each was a bug, fixed since): replayed on every run.
REGRESSIONS = {
    # An attribute name that is not UTF-8 (h5py lists it as bytes): AttributeError in the
    # skeleton copy; fixed in wavg/formats/hdf5/skeleton.py.
    "attribute_name_not_utf8": {
        "kind": "h5",
        "layer": "outer",
        "target": "newest",
        "ops": [["interesting", 3011, 3], ["set", 1084, 144], ["attr_delete", 38207, 22235]],
        "allow_nonfinite": False,
    },
    # A bit flip in a global heap collection inside a .keras archive: libhdf5 looped forever
    # reading a string attribute; now refused by wavg/formats/hdf5/walk.py check_global_heaps.
    "global_heap_endless_loop": {
        "kind": "keras",
        "layer": "inner",
        "target": "newest",
        "ops": [
            [
                "overwrite",
                384,
                "bc5b140a83ff4591c0be4d5e5efb561818ce6ea3e23e011e37f97946fc1797c0fbe77620a80d22e0"
                "b0d75c3514849ecc47",
            ],
            ["set", 8884, 26],
            ["flip", 2009, 8],
        ],
        "allow_nonfinite": False,
    },
}


REGRESSIONS.update(
    {
        # A flipped bit made a string attribute's variable-length kind 9 (neither sequence
        # nor string): libhdf5 crashed (SIGSEGV) reading it. When the output's structure is
        # rebuilt (--drop-optimizer) skeleton._check_types refuses it; here the newest file's
        # bytes are copied as they are, libhdf5 never converts the attribute, and the run
        # succeeds with the tensors averaged and the attribute as damaged as in the input.
        "vlen_kind_out_of_range": {
            "kind": "weights",
            "layer": "outer",
            "target": "newest",
            "ops": [["flip", 1746, 128], ["flip", 13593, 8]],
            "allow_nonfinite": False,
        },
        # A flipped bit shortened a float32 tensor's mantissa to 21 bits: h5py still calls it
        # float32, the raw read took the bytes as IEEE and the average was wrong. Refused.
        "non_ieee_float": {
            "kind": "weights",
            "layer": "outer",
            "target": "newest",
            "ops": [
                ["interesting", 15126, 1],
                ["attr_huge", 45422, 48225],
                ["set", 255, 63],
                ["flip", 14254, 4],
                ["flip", 14311, 2],
            ],
            "allow_nonfinite": False,
        },
        # A byte of the newest file's attribute metadata set to 128: h5py cannot read that
        # attribute (TypeError), in the input as in the output, which copies the newest
        # file's metadata as it is. The judge read the output first and called it a wrong
        # output; it is a success it cannot verify.
        "attribute_unreadable_in_newest_input": {
            "kind": "h5",
            "layer": "outer",
            "target": "newest",
            "ops": [["set", 1776, 128]],
            "allow_nonfinite": False,
        },
        # A deflated archive whose central directory claims zip version 10.6: zipfile raised
        # NotImplementedError. Refused in wavg/formats/keras_zip.py.
        "zip_version_unsupported": {
            "kind": "keras",
            "deflate": True,
            "layer": "outer",
            "target": "older",
            "ops": [["set", 2945, 106], ["flip", 938, 16], ["flip", 3872, 8]],
            "allow_nonfinite": False,
        },
    }
)
EXPECTED_OUTCOME = {
    "attribute_name_not_utf8": "ok",
    "global_heap_endless_loop": "refused:UnsafeCheckpoint",
    "vlen_kind_out_of_range": "ok",
    "non_ieee_float": "refused:CheckpointError",
    "zip_version_unsupported": "refused:CheckpointError",
    "attribute_unreadable_in_newest_input": "ok-unverified",
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_cases_the_fuzzer_found_stay_fixed(name, seeds):
    # In a subprocess: some of these crashed or hung the whole process before their fix.
    proc = subprocess.run(
        [
            sys.executable,
            str(hs.ROOT / "scripts" / "fuzz.py"),
            "--seeds",
            str(seeds),
            "--case",
            json.dumps(REGRESSIONS[name]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["outcome"] == EXPECTED_OUTCOME[name], result


def test_an_attribute_whose_name_is_not_utf8_is_copied_to_the_output(seeds, tmp_path):
    import h5py
    import numpy as np

    import wavg

    inputs = [tmp_path / "model_1.h5", tmp_path / "model_2.h5"]
    for name, path in zip(("h5_0.h5", "h5_1.h5"), inputs, strict=True):
        path.write_bytes((seeds / name).read_bytes())
    with h5py.File(inputs[1], "r+") as h5:
        space = h5py.h5s.create_simple((1,))
        attr = h5py.h5a.create(h5.id, b"\xff\xfename", h5py.h5t.NATIVE_INT32, space)
        attr.write(np.array([7], dtype="i4"))
    with hs.inputs_untouched(inputs):
        wavg.combine(inputs, tmp_path / "avg.h5")
    hs.assert_is_average(tmp_path / "avg.h5", inputs)
    with h5py.File(tmp_path / "avg.h5", "r") as h5:
        assert h5py.h5a.open(h5.id, b"\xff\xfename").shape == (1,)


VALID_BUT_UNUSUAL_ATTRIBUTES = """
import sys, h5py, numpy as np
path = sys.argv[1]
with h5py.File(path, "r+") as h5:
    seq = h5py.vlen_dtype(np.uint8)
    one = np.empty((), dtype=seq)
    one[()] = np.array([1, 2, 3], "u1")
    h5.attrs.create("sequence", one, dtype=seq)
    two = np.empty((2,), dtype=seq)
    two[0], two[1] = np.array([4], "u1"), np.array([5, 6], "u1")
    h5[next(iter(h5))].attrs.create("sequences", two, dtype=seq)
    h5.attrs["reference"] = h5[next(iter(h5))].ref
"""


def test_sequence_and_reference_attributes_are_copied_without_crashing(seeds, tmp_path):
    # The skeleton read them with their file type into an object array: SIGSEGV.
    import h5py

    inputs = [tmp_path / "model_1.h5", tmp_path / "model_2.h5"]
    for name, path in zip(("h5_0.h5", "h5_1.h5"), inputs, strict=True):
        path.write_bytes((seeds / name).read_bytes())
    subprocess.run([sys.executable, "-c", VALID_BUT_UNUSUAL_ATTRIBUTES, str(inputs[1])], check=True)
    out = tmp_path / "avg.h5"
    with hs.inputs_untouched(inputs):
        result = hs.run_wavg(["combine", *inputs, "-o", out])  # a crash must not end pytest
    assert result.code == 0, result.stderr
    hs.assert_is_average(out, inputs)
    with h5py.File(out, "r") as h5:
        assert list(h5.attrs["sequence"]) == [1, 2, 3]
        assert [list(x) for x in h5[next(iter(h5))].attrs["sequences"]] == [[4], [5, 6]]
        assert isinstance(h5.attrs["reference"], h5py.Reference)
