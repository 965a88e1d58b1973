"""Inputs after the oldest share its checked HDF5 structure only when their bytes prove it.

`Checkpoint._predict_from` lets an input take the oldest's walked and validated structure
when its HDF5 bytes outside the tensors' values are the oldest's byte for byte. The newest
is predicted too, so these tests pin down both halves of the contract on Keras-written
files: a newest of the same structure is not walked again and gets the same tensors, and a
newest whose structure differs in a single byte is walked (and refused when damaged).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py

from wavg.errors import CheckpointError
from wavg.formats.registry import open_checkpoint

SAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("sample_checkpoints").glob("*.h5"))


def _tensors(ckpt):
    return {name: (t.offset, t.nbytes, t.shape, str(t.storage)) for name, t in ckpt.tensors.items()}


def test_a_newest_of_the_same_structure_takes_the_oldest_s_without_a_walk():
    oldest = open_checkpoint(SAMPLES[0])
    newest = open_checkpoint(SAMPLES[-1], like=oldest)
    walked = open_checkpoint(SAMPLES[-1])
    try:
        assert newest._h5 is None  # never opened through libhdf5: verified, not walked
        assert walked._h5 is not None
        assert _tensors(newest) == _tensors(walked)
        assert newest.tensors is not oldest.tensors  # re-flagging the newest's is its own
    finally:
        for ckpt in (oldest, newest, walked):
            ckpt.close()


def test_a_newest_that_differs_outside_its_values_is_walked(tmp_path):
    changed = tmp_path / "model_499.h5"
    shutil.copy(SAMPLES[-1], changed)
    with h5py.File(changed, "r+") as h5:  # same length, one attribute's bytes differ
        assert h5.attrs["backend"] == "tensorflow"
        h5.attrs.modify("backend", "tensorflux")
    assert changed.stat().st_size == SAMPLES[-1].stat().st_size
    oldest = open_checkpoint(SAMPLES[0])
    newest = open_checkpoint(changed, like=oldest)
    try:
        assert newest._h5 is not None  # the comparison failed, so it was walked
        assert _tensors(newest) == _tensors(oldest)
    finally:
        oldest.close()
        newest.close()


def test_a_newest_damaged_anywhere_in_its_structure_is_walked_or_refused(tmp_path):
    """A byte flipped anywhere in the newest's HDF5 structure either fails its own walk
    (an error naming it) or is walked on its own bytes: never passed on the oldest's walk."""
    oldest = open_checkpoint(SAMPLES[0])
    structure = [  # every byte outside the tensors' values (a sample of them)
        start + at + i
        for start, _, parts in oldest._metadata_bytes()
        for at, expected in parts
        for i in range(len(expected))
    ]
    original = SAMPLES[-1].read_bytes()
    outcomes = set()
    try:
        for offset in structure[:: max(1, len(structure) // 64)]:
            data = bytearray(original)
            data[offset] ^= 0xFF
            damaged = tmp_path / f"model_{offset}.h5"
            damaged.write_bytes(bytes(data))
            try:
                newest = open_checkpoint(damaged, like=oldest)
            except CheckpointError as exc:
                assert str(damaged) in str(exc)
                outcomes.add("refused")
                continue
            try:
                assert newest._h5 is not None, offset
                outcomes.add("walked")
            finally:
                newest.close()
    finally:
        oldest.close()
    assert "refused" in outcomes
