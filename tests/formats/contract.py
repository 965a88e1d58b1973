"""The contract every checkpoint format keeps, as one base class each format's tests subclass.

In the style of zarr's ``StoreTests`` and fsspec's ``tests/abstract``: a subclass says how to
get three inputs written by Keras (oldest first), how its arrays are read back without wavg
(h5py, zipfile, TensorStore) and how to name an output; the base class asserts the round trip
against a float64 numpy reference, the refusal of a truncated input, old-or-new after a
death at every step of the commit, and the local result from inputs in a bucket and in an
output written to one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from support import multifile as hm
from support import safety as hs
from support.kerasfiles import assert_one_line_error, run_wavg
from support.remote import BUCKET, get, keys

import wavg
from wavg.averaging.schemes import raw_weights

OPTIMIZER_GROUPS = ("optimizer", "optimizer_weights")


class FormatContract:
    """What every format must do; subclasses fill in the format's particulars below."""

    #: the output's name (its suffix chooses the format wavg writes)
    output_name: str
    #: whether averaging a run twice writes the same bytes (not where names are random)
    same_bytes: bool = True
    #: the modules whose `os` carries the output's commit steps (see `hm.run_dying_at`)
    commit_modules: tuple[str, ...] = hm.COMMIT_MODULES

    @pytest.fixture
    def inputs(self) -> list[Path]:
        """Three checkpoints of one run written by Keras, oldest first."""
        raise NotImplementedError

    def arrays(self, path: Path) -> dict[str, np.ndarray]:
        """Every array of the checkpoint at `path`, by name, read without wavg."""
        raise NotImplementedError

    def averaged(self, name: str, value: np.ndarray) -> bool:
        """Whether wavg averages this array (the rest is copied from the newest input)."""
        return value.dtype.kind == "f" and name.split("/", 1)[0] not in OPTIMIZER_GROUPS

    def files(self, path: Path) -> list[Path]:
        """The files the checkpoint at `path` is made of."""
        return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]

    def damaged_file(self, path: Path) -> Path:
        """The file of the checkpoint at `path` that the truncation test cuts short."""
        return self.files(path)[0]

    def copy(self, path: Path, directory: Path) -> Path:
        """The checkpoint at `path` copied into `directory` (made), under the same name."""
        if path.is_dir():
            return Path(shutil.copytree(path, directory / path.name))
        directory.mkdir(parents=True, exist_ok=True)
        for file in self.files(path):
            shutil.copy2(file, directory / file.name)
        return directory / path.name

    def upload(self, client, path: Path, prefix: str) -> str:
        """Put the checkpoint at `path` under `prefix` in the test bucket, file by file, as
        ``aws s3 cp --recursive`` would; return its URL."""
        for file in self.files(path):
            key = f"{prefix}/{file.relative_to(path.parent).as_posix()}"
            client.upload_file(str(file), BUCKET, key)
        return f"s3://{BUCKET}/{prefix}/{path.name}"

    def previous_output(self, inputs: list[Path], out: Path) -> None:
        """Leave an output at `out` that the kill test's run replaces: a two-input average."""
        wavg.combine(inputs[:2], out)

    # -----------------------------------------------------------------------------------------
    # helpers of the assertions

    def reference(self, inputs: list[Path], scheme: str) -> dict[str, np.ndarray]:
        """The expected output's arrays: each averaged array's weighted mean summed in float64
        and rounded once to its dtype; every other array the newest input's."""
        loaded = [self.arrays(path) for path in inputs]
        weights = raw_weights(len(inputs), scheme)
        expected = {}
        for name, newest in loaded[-1].items():
            if self.averaged(name, newest):
                stack = np.stack([arrays[name].astype(np.float64) for arrays in loaded])
                mean = np.average(stack, axis=0, weights=weights)
                expected[name] = mean.astype(newest.dtype)
            else:
                expected[name] = newest
        assert any(self.averaged(n, v) for n, v in expected.items()), "nothing is averaged"
        return expected

    def assert_arrays(self, path: Path, expected: dict[str, np.ndarray]) -> None:
        """The checkpoint at `path` holds exactly `expected`, bit for bit and dtype for dtype."""
        got = self.arrays(path)
        assert sorted(got) == sorted(expected)
        for name, value in expected.items():
            assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
            assert got[name].tobytes() == value.tobytes(), name

    def assert_same_output(self, got: Path, want: Path) -> None:
        """`got` holds `want`'s arrays, and its bytes where the format writes the same twice."""
        self.assert_arrays(got, self.arrays(want))
        if self.same_bytes:
            assert [p.read_bytes() for p in self.files(got)] == [
                p.read_bytes() for p in self.files(want)
            ]

    def state(self, out: Path) -> dict[str, str] | None:
        """sha256 of each file of the output at `out`, by path relative to its folder (None:
        there is none)."""
        if not out.exists():
            return None
        found = self.files(out)
        return {
            str(p.relative_to(out.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in found
        }

    @staticmethod
    def s3_client(s3):
        """The test bucket's client, with s3fs made to read the server's endpoint afresh."""
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        return s3[0]

    # -----------------------------------------------------------------------------------------
    # the contract

    @pytest.mark.parametrize("scheme", ["equal", "linear"])
    def test_round_trip_equals_the_float64_reference(self, inputs, tmp_path, scheme):
        out = tmp_path / self.output_name
        wavg.combine(inputs, out, scheme=scheme)
        self.assert_arrays(out, self.reference(inputs, scheme))

    def test_identical_copies_average_to_the_input_itself(self, inputs, tmp_path):
        copies = [self.copy(inputs[-1], tmp_path / f"copy{i}") for i in range(3)]
        out = tmp_path / self.output_name
        wavg.combine(copies, out, order="given")
        self.assert_arrays(out, self.arrays(inputs[-1]))

    def test_a_truncated_input_is_refused_in_one_line_naming_it(self, inputs, tmp_path):
        copies = [self.copy(path, tmp_path / f"in{i}") for i, path in enumerate(inputs)]
        damaged = self.damaged_file(copies[1])
        with damaged.open("r+b") as handle:
            handle.truncate(damaged.stat().st_size // 2)
        out = tmp_path / "out" / self.output_name
        out.parent.mkdir()
        with hs.inputs_untouched([f for copy in copies for f in self.files(copy)]):
            code, _, stderr = run_wavg("combine", *copies, "-o", out)
        assert_one_line_error(code, stderr)
        assert str(damaged) in stderr or str(copies[1]) in stderr, stderr
        assert list(out.parent.iterdir()) == []

    def test_death_at_any_commit_step_leaves_the_previous_output_or_the_new_one(
        self, inputs, tmp_path
    ):
        """A run that completes takes N steps; a run dying before step k, for each k of 1..N,
        leaves the previous output (byte for byte) or the complete new one. Each k runs in a
        folder of its own holding a copy of the previous output, several at once."""
        previous_folder = tmp_path / "previous"
        previous_folder.mkdir()
        self.previous_output(inputs, previous_folder / self.output_name)
        before = self.state(previous_folder / self.output_name)
        previous = self.arrays(previous_folder / self.output_name) if before else None
        new = self.reference(inputs, "equal")

        def die_at(step: int) -> tuple[Path, subprocess.CompletedProcess]:
            folder = Path(shutil.copytree(previous_folder, tmp_path / f"step{step}"))
            out = folder / self.output_name
            return out, hm.run_dying_at(step, inputs, out, modules=self.commit_modules)

        out, whole = die_at(1 << 30)
        assert whole.returncode == 0, whole.stderr
        self.assert_arrays(out, new)
        assert hs.leftovers(out.parent) == [], "a run that went through left temporary files"
        steps = int(whole.stdout.split()[-1])  # the driver prints the steps it counted
        outcomes = {"previous": 0, "new": 0}
        # One step more than the whole run took: a format whose step count varies from run
        # to run (TensorStore writes an Orbax step as 3 or 4 data files) is killed at its
        # last step too; a run that finished before the step it was to die at must have
        # counted fewer steps and written the new output.
        with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            for (out, proc), step in zip(
                pool.map(die_at, range(1, steps + 2)), range(1, steps + 2), strict=True
            ):
                if proc.returncode == 0:
                    assert int(proc.stdout.split()[-1]) < step, proc.stdout
                    self.assert_arrays(out, new)
                    outcomes["new"] += 1
                    continue
                assert proc.returncode == 137, proc.stderr
                if self.state(out) == before:
                    if previous is not None:
                        self.assert_arrays(out, previous)  # still loadable
                    outcomes["previous"] += 1
                else:
                    self.assert_arrays(out, new)
                    outcomes["new"] += 1
        assert outcomes["previous"] > 0, outcomes
        print(f"{type(self).__name__}: died before each of {steps} steps: {outcomes}")

    def test_the_same_inputs_in_a_bucket_give_the_local_result(self, inputs, s3, tmp_path):
        client = self.s3_client(s3)
        prefix = f"contract/{type(self).__name__}"
        urls = [self.upload(client, path, f"{prefix}/{i}") for i, path in enumerate(inputs)]
        local, remote = (
            tmp_path / "local" / self.output_name,
            tmp_path / "remote" / self.output_name,
        )
        local.parent.mkdir()
        remote.parent.mkdir()
        wavg.combine(inputs, local)
        wavg.combine(urls, remote, order="given")
        self.assert_same_output(remote, local)

    def test_an_output_in_a_bucket_holds_the_local_result(self, inputs, s3, tmp_path):
        client = self.s3_client(s3)
        prefix = f"contract-output/{type(self).__name__}"
        url = f"s3://{BUCKET}/{prefix}/{self.output_name}"
        local = tmp_path / "local" / self.output_name
        local.parent.mkdir()
        wavg.combine(inputs, local)
        wavg.combine(inputs, url)
        downloaded = tmp_path / "downloaded"
        for key in keys(client, prefix):
            target = downloaded / key.removeprefix(f"{prefix}/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(get(client, key))
        self.assert_same_output(downloaded / self.output_name, local)
