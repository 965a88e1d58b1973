"""The wavg executable under measurement: found beside the harness's Python (or given), probed
once, and its modules compiled to bytecode as an installed wheel has them.

Shared by run.py, sharded.py and compare.py; it imports only measure.py, never a harness.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import measure


def find_wavg(given: Path | None = None) -> Path:
    """`given`, else the wavg console script of the interpreter running the harness."""
    beside = Path(sys.executable).parent / "wavg"
    found = given or (beside if beside.exists() else shutil.which("wavg"))
    if not found:
        sys.exit("bench: no wavg executable next to this Python; run `make install` first")
    probe = measure.run_once([str(found), "combine", "--help"], 60.0)
    if not probe.ok:
        sys.exit(f"bench: `wavg combine --help` failed:\n{probe.stderr_tail}")
    compile_bytecode(Path(found))
    return Path(found)


def compile_bytecode(wavg: Path) -> None:
    """Compile the measured wavg's modules to bytecode, as installing its wheel does.

    An editable install has none, and with ``PYTHONDONTWRITEBYTECODE`` set (as on the
    machines these numbers come from) every run compiled wavg's sources again: ~29 ms per
    run, a sixth of averaging a small model, that no installed copy pays. The .pyc files go
    to ``__pycache__`` (git-ignored) beside the sources.
    """
    python = Path(wavg.read_text().splitlines()[0].removeprefix("#!").strip())
    code = (
        "import compileall, os, sys, wavg; "
        "sys.exit(not compileall.compile_dir(os.path.dirname(wavg.__file__), quiet=1))"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench: compiling {wavg}'s modules failed: {done.stderr[-500:]}")
