"""`make bench` starts: the harness and every workload module it imports load and list their
cells (a module left naming what another one no longer defines fails here, not hours into a
benchmark run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_harness_imports_every_workload_and_lists_its_cells():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--list"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "groups=" in done.stdout
