"""What the command line loads at start-up (most of the wall time on a small model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_importing_the_package_loads_no_numpy():
    assert _python("import sys, wavg; print('numpy' in sys.modules)") == "False"


def test_wavg_combine_stays_the_function_when_its_module_is_imported_first():
    code = "from wavg.averaging.engine import plan_units; import wavg; print(type(wavg.combine).__name__)"
    assert _python(code) == "function"


def test_the_public_api_is_there_on_first_use():
    code = "import wavg; print(wavg.scheme_weights(2, 'linear').tolist(), wavg.combine.__name__)"
    assert _python(code) == "[0.3333333333333333, 0.6666666666666666] combine"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_the_cli_starts_no_spinning_blas_threads():
    """numpy's OpenBLAS would start a thread per core, each spinning a while (issue 11)."""
    count = "import os, wavg.cli, numpy; print(len(os.listdir('/proc/self/task')))"
    assert _python(count) == "1"
    if (os.cpu_count() or 1) > 1:  # the user's own setting wins
        assert int(_python(count, OPENBLAS_NUM_THREADS=str(os.cpu_count()))) > 1
