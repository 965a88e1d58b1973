"""The architecture as a test: import-linter's contracts in pyproject.toml all hold for wavg/.

The contracts (layers, no framework below workflows, no import cycle between siblings) are
checked by ``lint-imports``, as ``make lint`` runs it. The other tests prove the check bites:
a copy of the package with one wrong arrow added (inside a function, where a grep for
top-level imports would miss it) must be reported, naming the contract and the import.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
LAYERS = "Layers: storage <- formats <- averaging <- workflows <- cli"
FORBIDDEN = "Averaging, formats and storage never import a deep-learning framework or the workflows"
ACYCLIC = "No import cycles inside any package"
DASK = "Storage and formats never import Dask (only the distributed driver in averaging does)"


def lint_imports(root: Path) -> tuple[int, str, dict[str, str]]:
    """Run lint-imports on the `wavg` package under `root` with `root`'s pyproject.toml.

    Returns (exit code, output, {contract name: "KEPT" or "BROKEN"}). `root` alone is on the
    path, so the package analysed is the one there, never an installed copy.
    """
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "300"}
    done = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    verdicts = dict(re.findall(r"^(.+) (KEPT|BROKEN)$", output, flags=re.M))
    return done.returncode, output, verdicts


def test_every_contract_is_kept():
    code, output, verdicts = lint_imports(ROOT)
    assert set(verdicts) == {LAYERS, FORBIDDEN, ACYCLIC, DASK}, output
    assert verdicts == dict.fromkeys(verdicts, "KEPT"), output
    assert code == 0, output


@pytest.fixture(scope="module")
def clean_copy(tmp_path_factory) -> Path:
    """wavg/ and pyproject.toml copied as they are, to be edited by one test each."""
    root = tmp_path_factory.mktemp("architecture")
    shutil.copytree(ROOT / "wavg", root / "wavg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def with_wrong_arrow(clean_copy: Path, tmp_path: Path, edits: dict[str, str]) -> Path:
    """A copy of `clean_copy` where each module path of `edits` gets that code appended."""
    root = tmp_path / "project"
    shutil.copytree(clean_copy, root)
    for module, code in edits.items():
        path = root / module
        existing = path.read_text() if path.exists() else '"""Added by the test."""\n'
        path.write_text(existing + "\n\n" + code)
    return root


@pytest.mark.parametrize(
    ("contract", "edits", "reported"),
    [
        pytest.param(
            LAYERS,
            {
                "wavg/storage/local.py": (
                    "def _wrong_arrow():\n    from wavg.formats import registry\n\n"
                    "    return registry\n"
                )
            },
            "wavg.storage.local -> wavg.formats.registry",
            id="storage-imports-formats",
        ),
        pytest.param(
            FORBIDDEN,
            {
                "wavg/averaging/engine.py": "def _wrong_arrow():\n    import keras\n\n    return keras\n"
            },
            "wavg.averaging.engine -> keras",
            id="averaging-imports-keras",
        ),
        pytest.param(
            ACYCLIC,
            {
                "wavg/storage/first.py": "from wavg.storage import second\n",
                "wavg/storage/second.py": "def _back():\n    from wavg.storage import first\n",
            },
            "No cycles are allowed in wavg.storage.",
            id="cycle-between-siblings",
        ),
    ],
)
def test_one_wrong_arrow_breaks_its_contract(clean_copy, tmp_path, contract, edits, reported):
    code, output, verdicts = lint_imports(with_wrong_arrow(clean_copy, tmp_path, edits))
    assert verdicts.get(contract) == "BROKEN", output
    assert reported in output, output
    assert code != 0, output
