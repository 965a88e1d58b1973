"""An Orbax root written to a bucket (moto's S3 server on 127.0.0.1): the same arrays as the
same average written on disk, read back by wavg from the bucket and by Keras/Orbax and Orbax's
own step listing; a run killed at every upload leaves no step any reader takes as committed,
and the next run removes what it left.

The inputs are OrbaxCheckpoint roots Keras wrote (``orbax_keras_job.py``), uploaded object
by object as ``aws s3 cp --recursive`` would.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support.kerasfiles import assert_one_line_error, run_wavg
from support.orbax_runs import array_names, keras_jobs, read_array
from support.remote import BUCKET, get, keys

from wavg.formats.orbax.bucket import last_objects
from wavg.storage import remote

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# The command docs/orbax-buckets.md shows, run as it is written there.
COMMAND = "wavg combine s3://wavg-test/run/ckpt --last 3 -o s3://wavg-test/run/avg"
# Orbax's own listing of a root's finalized steps, in its commit-file mode (its default on
# gs://): a step counts once its commit_success.txt is there. epath's fsspec backend, since
# TensorFlow's file systems (which epath prefers when TensorFlow is installed) have no s3.
ORBAX_STEPS = """
import json, sys
import orbax.checkpoint as ocp
from orbax.checkpoint import options
mode = options.AtomicityOptions(mode=options.AtomicityMode.COMMIT_FILE)
settings = ocp.CheckpointManagerOptions(read_only=True, atomicity_options=mode)
roots = [ocp.CheckpointManager(url, options=settings) for url in sys.argv[1:]]
print(json.dumps([list(root.all_steps()) for root in roots]))
"""


@pytest.fixture(scope="module")
def root(orbax_roots) -> Path:
    """An OrbaxCheckpoint root of steps 0-3 written by Keras on JAX."""
    return orbax_roots / "jax" / "functional"


@pytest.fixture
def s3(s3):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a client that reads this module's endpoint
    return s3


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)


def upload(client, root: Path, prefix: str) -> str:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(root).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


def download(client, prefix: str, directory: Path) -> Path:
    for key in keys(client, f"{prefix}/"):
        target = directory / key.removeprefix(f"{prefix}/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(get(client, key))
    return directory


def local_average(root: Path, tmp_path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of the same average written on disk (the reference), and its files."""
    out = tmp_path / "local"
    code, _, stderr = run_wavg("combine", root, "--last", "3", "-o", out)
    assert code == 0, stderr
    arrays = {name: read_array(out / "3", name) for name in array_names(out / "3")}
    return arrays, shape_of(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def shape_of(names) -> list[str]:
    """The object or file names of a root, its OCDBT data files as one ``d/*`` (they are
    named at random, and TensorStore decides how many it writes)."""
    return sorted({n if "/d/" not in n else n.rsplit("/", 1)[0] + "/*" for n in names})


def wavg_view(url: str) -> dict[str, np.ndarray] | None:
    """The arrays wavg reads from the step at `url` in the bucket; None if wavg finds no
    Orbax step there."""
    from wavg.formats.orbax.remote import expand_url
    from wavg.formats.orbax.step import OrbaxStep

    found = expand_url(url)
    if found is None:
        return None
    step = OrbaxStep(found[0][0])
    arrays = {}
    for name, tensor in step.tensors.items():
        array = np.empty(tensor.shape, tensor.storage)
        for _, count, slices in step.blocks(tensor, 0):
            block = step.read(tensor, 0, count, slices, np.empty(0))
            array[slices] = block.view(tensor.storage).reshape(array[slices].shape)
        arrays[name] = array
    return arrays


def orbax_steps(*urls: str) -> list[list[int]]:
    """The finalized steps Orbax lists in each root of `urls` (one process: jax is slow to
    import)."""
    env = {**os.environ, "EPATH_USE_TF": "false", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", ORBAX_STEPS, *urls], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want) and want
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


def claims(client, prefix: str) -> list[str]:
    """The run claims beside the output root ``prefix/avg``."""
    return keys(client, f"{prefix}/.avg.wavg-tmp-")


def test_the_documented_command_writes_the_local_average_readable_by_wavg_keras_and_orbax(
    s3, root, tmp_path
):
    client, _ = s3
    upload(client, root, "run/ckpt")
    code, _, stderr = run_wavg(*shlex.split(COMMAND)[1:])
    assert code == 0, stderr
    want, files = local_average(root, tmp_path)
    assert shape_of(k.removeprefix("run/avg/") for k in keys(client, "run/avg/")) == files
    assert_identical(wavg_view(f"s3://{BUCKET}/run/avg/3"), want)
    assert orbax_steps(f"s3://{BUCKET}/run/avg") == [[3]]
    assert claims(client, "run") == []
    marker = get(client, "run/avg/3/commit_success.txt").decode()
    assert marker == f"Checkpoint commit was successful to s3://{BUCKET}/run/avg/3"
    # Keras loads the root (through Orbax) with the same weights as the local one.
    copy = download(client, "run/avg", tmp_path / "downloaded")
    assert_identical({n: read_array(copy / "3", n) for n in array_names(copy / "3")}, want)
    npz = tmp_path / "loaded.npz"
    keras_jobs(("jax", "load", f"{copy},functional,{npz}"))
    loaded = np.load(npz)
    assert loaded.files
    for name in loaded.files:
        np.testing.assert_array_equal(loaded[name], want[name].astype(np.float32), name)


def test_a_prefix_holding_anything_is_refused_and_left_alone(s3, root):
    """As on disk, an Orbax output is a new root: the training root itself, or a prefix
    holding objects no wavg run claims, is refused before anything is written."""
    client, _ = s3
    url = upload(client, root, "taken/ckpt")
    upload(client, root / "3", "taken/other/3")
    before = {k: get(client, k) for k in keys(client, "taken/")}
    for out in (url, f"s3://{BUCKET}/taken/other"):
        code, _, stderr = run_wavg("combine", url, "--last", "2", "-o", out)
        assert_one_line_error(code, stderr, out)
        assert {k: get(client, k) for k in keys(client, "taken/")} == before


def test_a_live_runs_claim_refuses_a_second_writer(s3, root):
    client, _ = s3
    url = upload(client, root, "busy/ckpt")
    stamp = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    claim = f"busy/.avg.wavg-tmp-{os.getpid()}-0badcafe"
    client.put_object(Bucket=BUCKET, Key=claim, Body=json.dumps(stamp).encode())
    code, _, stderr = run_wavg("combine", url, "-o", f"s3://{BUCKET}/busy/avg")
    assert_one_line_error(code, stderr, f"s3://{BUCKET}/busy/avg", "another wavg run")
    assert keys(client, "busy/avg") == [] and claims(client, "busy") == [claim]


def test_a_run_killed_at_any_upload_leaves_no_committed_step_and_the_next_run_cleans_up(
    s3, root, tmp_path
):
    """SIGKILL as the server receives the PUT of an object of the step (the first one, the
    OCDBT manifest, the first marker, the last): no reader takes the step as committed
    (Orbax's listing is empty; wavg sees no step, or one whose arrays are all there), the
    inputs beside are untouched, and the next run for the same output writes the whole
    average and leaves nothing else."""
    client, recorder = s3
    url = upload(client, root, "kill/ckpt")
    inputs = {k: get(client, k) for k in keys(client, "kill/ckpt/")}
    want, files = local_average(root, tmp_path)
    out = f"s3://{BUCKET}/kill/avg"
    command = [sys.executable, "-m", "wavg.cli", "combine", url, "--last", "3", "-o", out]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outcomes = {"no step": 0, "complete step": 0}
    # The first object (""), the OCDBT manifest, wavg's marker of a step, Orbax's commit point.
    first, *_, commit_point = last_objects("3")
    kills = ("", "3/pytree/manifest.ocdbt", first, commit_point)
    for i, at in enumerate(kills):
        running: list[subprocess.Popen] = []

        def kill_at_put(method, path, environ, at=at, running=running):
            key = path.removeprefix(f"/{BUCKET}/kill/avg/")
            if method == "PUT" and key != path and at in ("", key):
                os.kill(running[0].pid, signal.SIGKILL)
                return False
            return None

        recorder.hook = kill_at_put
        try:
            running.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE))
            _, stderr = running[0].communicate(timeout=300)
            recorder.wait_idle()
        finally:
            recorder.hook = None
        assert running[0].returncode == -signal.SIGKILL, (at, stderr.decode()[-2000:])
        for key in keys(client, "kill/avg/"):  # kept for Orbax's listing, at the end
            client.copy_object(
                Bucket=BUCKET,
                Key=key.replace("kill/avg/", f"killed/{i}/avg/", 1),
                CopySource={"Bucket": BUCKET, "Key": key},
            )
        seen_by_wavg = wavg_view(f"{out}/3")
        if seen_by_wavg is None:
            outcomes["no step"] += 1
        else:  # its markers are there, and so is every array
            assert_identical(seen_by_wavg, want)
            outcomes["complete step"] += 1
        code, _, stderr = run_wavg("combine", url, "--last", "3", "-o", out)
        assert code == 0, stderr
        assert_identical(wavg_view(f"{out}/3"), want)
        assert shape_of(k.removeprefix("kill/avg/") for k in keys(client, "kill/avg/")) == files
        assert claims(client, "kill") == []
        assert {k: get(client, k) for k in keys(client, "kill/ckpt/")} == inputs
        for key in keys(client, "kill/avg/"):
            client.delete_object(Bucket=BUCKET, Key=key)
    killed = [f"s3://{BUCKET}/killed/{i}/avg" for i in range(len(kills))]
    assert orbax_steps(*killed) == [[]] * len(kills)
    assert outcomes["no step"] > 0, outcomes
    print(f"killed at the PUT of each of {kills}: {outcomes}")


def test_a_failed_upload_removes_what_it_uploaded_and_its_claim(s3, root):
    """The service refuses a marker (every try): an error line naming it, and neither the
    objects already uploaded nor the claim are left."""
    client, recorder = s3
    url = upload(client, root, "fails/ckpt")
    recorder.fail_prefix, recorder.failures = f"/{BUCKET}/fails/avg/3/_CHECKPOINT_METADATA", 99
    try:
        code, _, stderr = run_wavg("combine", url, "-o", f"s3://{BUCKET}/fails/avg")
    finally:
        recorder.failures = 0
    assert code == 1 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]  # after the plan table
    assert last.startswith(f"wavg: error: s3://{BUCKET}/fails/avg/3/_CHECKPOINT_METADATA: ")
    assert keys(client, "fails/avg/") == [] and claims(client, "fails") == []


def test_sigterm_during_the_upload_removes_what_it_uploaded_and_its_claim(s3, root):
    """The signal takes effect between two objects, so the cleanup sees every object the
    run uploaded: none is left, nor the claim."""
    client, recorder = s3
    url = upload(client, root, "term/ckpt")
    out = f"s3://{BUCKET}/term/avg"
    running: list[subprocess.Popen] = []
    later = threading.Event()

    def term_at_manifest(method, path, environ):
        """SIGTERM while the manifest's PUT is in flight; the PUT is answered only once the
        claim is deleted (or after 5 s): a run that acted on the signal before its PUT was
        answered would see the manifest land after its cleanup."""
        if method == "PUT" and path == f"/{BUCKET}/term/avg/3/pytree/manifest.ocdbt":
            os.kill(running[0].pid, signal.SIGTERM)
            later.wait(timeout=5)
        elif method == "DELETE" and path.startswith(f"/{BUCKET}/term/.avg.wavg-tmp-"):
            later.set()
        return None

    recorder.hook = term_at_manifest
    try:
        command = [sys.executable, "-m", "wavg.cli", "combine", url, "-o", out]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        running.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
        _, stderr = running[0].communicate(timeout=300)
        recorder.wait_idle()
    finally:
        recorder.hook = None
    assert running[0].returncode == 143, stderr
    assert "Traceback" not in stderr
    assert keys(client, "term/avg/") == [] and claims(client, "term") == []
