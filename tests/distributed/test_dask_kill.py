"""``wavg combine --dask local:2`` with one worker process killed by ``kill -9`` while it
writes its part: the run finishes with the single-process result (Dask reruns the part), or
fails in one line with the previous output intact; the index is never partial."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from support import multifile as hm
from support import safety as hs

import wavg

SHARD_GB = 0.004  # a few MB: several shards per part, each written long enough to be seen


@pytest.mark.slow
def test_kill_9_of_a_worker_mid_run_gives_the_same_result_or_one_line_and_the_old_output(
    multi, tmp_path
):
    reference = tmp_path / "ref" / "avg.weights.json"
    reference.parent.mkdir()
    wavg.combine(multi.sharded, reference, max_shard_gb=SHARD_GB)
    want = hm.sharded_tensors(reference)
    out = tmp_path / "out" / "avg.weights.json"
    out.parent.mkdir()
    wavg.combine(multi.sharded[:2], out)  # the previous output
    before = hm.output_state(out)
    temp = re.compile(rf"\.{re.escape(out.name)}\.wavg-part-\d+-tmp-(\d+)-\d+")
    proc = subprocess.Popen(
        [
            *hs.WAVG,
            "combine",
            *map(str, multi.sharded),
            "-o",
            str(out),
            "--dask",
            "local:2",
            "--max-shard-size",
            str(SHARD_GB),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        for name in os.listdir(out.parent):
            found = temp.fullmatch(name)
            if found:
                killed = int(found[1])
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.005)
    stdout, stderr = proc.communicate(timeout=300)
    assert killed is not None, "no part was seen writing"
    if proc.returncode == 0:
        assert_same = hm.sharded_tensors(out)
        assert assert_same.keys() == want.keys()
        for name, value in want.items():
            assert assert_same[name].tobytes() == value.tobytes(), name
        assert {p.name for p in out.parent.iterdir()} == {
            out.name,
            "avg_00000.weights.h5",
            *hm.shard_names(out),
        }
    else:
        errors = [line for line in stderr.splitlines() if line.startswith("wavg: error:")]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr
        assert hm.output_state(out) == before
