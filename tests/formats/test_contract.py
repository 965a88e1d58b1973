"""The format contract (contract.py) run by every format wavg reads and writes.

Each class only says where its three Keras-written inputs come from (session fixtures, so the
suite trains nothing of its own), how to read them back without wavg and how to name an
output; the assertions are the base class's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from contract import FormatContract
from support import multifile as hm
from support.reference import h5_tensors


class SingleFile(FormatContract):
    """A checkpoint that is one HDF5 file, or a .keras archive holding one."""

    fmt: str

    @pytest.fixture
    def inputs(self, runs) -> list[Path]:
        return runs["conv_bn"].files[self.fmt]

    def arrays(self, path: Path) -> dict[str, np.ndarray]:
        return h5_tensors(path)


class TestLegacyH5(SingleFile):
    fmt, output_name = "h5", "avg.h5"


class TestKerasArchive(SingleFile):
    fmt, output_name = "keras", "avg.keras"


class TestWeightsH5(SingleFile):
    fmt, output_name = "weights.h5", "avg.weights.h5"


class TestShardedWeights(FormatContract):
    output_name = "avg.weights.json"
    same_bytes = False  # an output's shards get names of their own, which its index holds

    @pytest.fixture
    def inputs(self, multi_file_run) -> list[Path]:
        indexes = multi_file_run.files["weights.json"]
        assert all(len(hm.shard_names(index)) > 1 for index in indexes)  # truly sharded
        return indexes

    def arrays(self, path: Path) -> dict[str, np.ndarray]:
        return hm.sharded_tensors(path)

    def files(self, path: Path) -> list[Path]:
        return [path, *hm.shard_names_paths(path)]

    def damaged_file(self, path: Path) -> Path:
        return hm.shard_names_paths(path)[-1]


class TestKerasFolder(FormatContract):
    output_name = "avg"

    @pytest.fixture
    def inputs(self, multi_file_run) -> list[Path]:
        return multi_file_run.files["folder"]

    def arrays(self, path: Path) -> dict[str, np.ndarray]:
        return h5_tensors(path / "model.weights.h5")

    def damaged_file(self, path: Path) -> Path:
        return path / "model.weights.h5"


class TestOrbaxStep(FormatContract):
    output_name = "avg"  # an OrbaxCheckpoint root, holding the newest input's step
    same_bytes = False  # OCDBT names its data files at random and records the store's identity
    commit_modules = (*hm.COMMIT_MODULES, "wavg.formats.orbax.step")

    @pytest.fixture
    def inputs(self, request) -> list[Path]:
        missing = [m for m in ("tensorstore", "orbax.checkpoint") if not _installed(m)]
        if missing:
            pytest.skip(f"Orbax steps need {' and '.join(missing)} (pip install '.[dev]')")
        root = request.getfixturevalue("orbax_roots") / "jax" / "functional"
        return [root / str(step) for step in (1, 2, 3)]

    def arrays(self, path: Path) -> dict[str, np.ndarray]:
        from support.orbax_runs import array_names, read_array

        if not (path / "pytree").is_dir():  # a root: its one step
            (path,) = [p for p in path.iterdir() if p.name.isdigit()]
        return {name: read_array(path, name) for name in array_names(path)}

    def averaged(self, name: str, value: np.ndarray) -> bool:
        return value.dtype.kind == "f" and name.split(".")[0].endswith("trainable_variables")

    def damaged_file(self, path: Path) -> Path:
        return max((path / "pytree" / "d").iterdir(), key=lambda p: p.stat().st_size)

    def previous_output(self, inputs: list[Path], out: Path) -> None:
        """None: wavg never replaces an existing Orbax root (it refuses the run), so the
        old state a death must leave is no output at all."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
