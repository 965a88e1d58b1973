"""gs:// URLs against a real HTTP endpoint: gcp-storage-emulator, started in this process.

gcsfs finds the emulator the standard way (``STORAGE_EMULATOR_HOST``) and is told to send
no credentials through fsspec's configuration (``{"gs": {"token": "anon"}}``, what
``FSSPEC_GS_TOKEN=anon`` sets). The emulator's request handler is wrapped so the tests see
every request and the bytes it served, and can overwrite an object while wavg reads it.

One incompatibility is worked around here, in the test setup only: recent gcsfs (2026.10) enables
its "zonal/hierarchical bucket" support by default, which asks a gRPC control API over TLS
for each bucket's layout; the emulator speaks plain HTTP and no gRPC, so every such lookup
waits out a 60 s timeout before gcsfs falls back to its plain JSON API. The documented switch
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` turns that off (read when gcsfs is imported, so
the plain class is also registered for gs:// in case another test imported gcsfs first).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from support.kerasfiles import assert_one_line_error, run_wavg

from wavg.storage import remote

BUCKET = "wavg-gcs-test"


class Recorder:
    """Wraps the emulator's request handler: logs (method, path, range, bytes served)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, str, int]] = []
        self.hook = None  # hook(method, path, range header) before a request is served

    def handler(self, base: type) -> type:
        recorder = self

        class Recorded(base):
            def _record(self, method: str) -> None:
                self._served = 0
                path = self.path.split("?", 1)[0]
                span = self.headers.get("Range", "")
                if recorder.hook is not None:
                    recorder.hook(method, path, span)
                getattr(super(), f"do_{method}")()
                with recorder.lock:
                    recorder.log.append((method, path, span, self._served))

            def send_header(self, keyword, value):
                if keyword.lower() == "content-length":
                    self._served = int(value)
                super().send_header(keyword, value)

            def do_GET(self):
                self._record("GET")

            def do_POST(self):
                self._record("POST")

            def do_PUT(self):
                self._record("PUT")

            def do_DELETE(self):
                self._record("DELETE")

        return Recorded

    def media(self, prefix: str) -> list[tuple[str, int]]:
        """(Range header, bytes served) of each download of an object under `prefix`."""
        quoted = prefix.replace("/", "%2F")
        return [
            (span, n)
            for m, p, span, n in self.log
            if m == "GET" and "/download/" in p and (f"/o/{prefix}" in p or f"/o/{quoted}" in p)
        ]


@pytest.fixture(scope="module")
def gcs():
    """The emulator on 127.0.0.1 (a free port), a bucket, and a gcsfs pointed at it."""
    import fsspec.config
    import fsspec.registry
    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
    with pytest.MonkeyPatch.context() as mp:
        # One thread per request, as a real service answers concurrent reads (the emulator
        # builds a plain HTTPServer, one request at a time, when its thread starts).
        mp.setattr(emulator, "server", SimpleNamespace(HTTPServer=ThreadingHTTPServer))
        server.start()
    recorder = Recorder()
    httpd = server._api._httpd
    made = httpd.RequestHandlerClass  # partial(RequestHandler, storage)
    httpd.RequestHandlerClass = functools.partial(recorder.handler(made.func), *made.args)
    host, port = httpd.server_address
    shown = httpd.handle_error

    def handle_error(request, address):  # a client that hung up (wavg stopped reading)
        if not isinstance(sys.exc_info()[1], BrokenPipeError | ConnectionResetError):
            shown(request, address)

    httpd.handle_error = handle_error
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", f"http://{host}:{port}")
        mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        mp.setitem(fsspec.config.conf, "gs", {"token": "anon"})
        if "gcsfs" in sys.modules:  # imported before the switch above was set
            import gcsfs.core

            mp.setitem(fsspec.registry._registry, "gs", gcsfs.core.GCSFileSystem)
        import gcsfs

        fs = fsspec.filesystem("gs")
        yield fs, recorder
        gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(autouse=True)
def fresh(gcs, monkeypatch):
    """A new gcsfs client per test, an empty log, quick retries."""
    fs, recorder = gcs
    fs.invalidate_cache()
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)
    recorder.log.clear()
    recorder.hook = None


def put(fs, files, prefix: str) -> list[str]:
    for path in files:
        fs.put_file(str(path), f"{BUCKET}/{prefix}/{Path(path).name}")
    fs.invalidate_cache()
    return [f"gs://{BUCKET}/{prefix}/{Path(p).name}" for p in files]


def names(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{BUCKET}/{prefix}"))


@pytest.mark.parametrize("fmt", ["h5", "keras"])
def test_gs_inputs_average_to_the_bytes_local_inputs_give(gcs, runs, tmp_path, fmt):
    fs, recorder = gcs
    files = runs["conv_bn"].files[fmt]
    put(fs, files, f"formats/{fmt}")
    local_out, remote_out = tmp_path / f"local.{fmt}", tmp_path / f"remote.{fmt}"
    assert run_wavg("combine", *files, "-o", local_out)[0] == 0
    pattern = f"gs://{BUCKET}/formats/{fmt}/conv_bn_*.{fmt}"  # quoted: wavg lists the bucket
    code, out, err = run_wavg("combine", pattern, "-o", remote_out, "--json")
    assert code == 0, err
    assert remote_out.read_bytes() == local_out.read_bytes()
    summary = json.loads(out)
    assert [i["path"] for i in summary["inputs"]] == [
        f"gs://{BUCKET}/formats/{fmt}/{f.name}" for f in files
    ]
    media = recorder.media(f"formats/{fmt}/")
    assert summary["bytes_fetched"] == sum(n for _, n in media) > 0
    assert all(span.startswith("bytes=") for span, _ in media)  # ranges, never whole objects


def test_sharded_checkpoints_from_gs_to_gs(gcs, multi, tmp_path):
    from support import multifile as hm

    fs, _ = gcs
    files = [i for index in multi.sharded for i in (index, *hm.shard_names_paths(index))]
    put(fs, files, "sharded/in")
    local_out = tmp_path / "local.weights.json"
    assert run_wavg("combine", *multi.sharded, "-o", local_out)[0] == 0
    target = f"gs://{BUCKET}/sharded/out/avg.weights.json"
    pattern = f"gs://{BUCKET}/sharded/in/ep*.weights.json"
    code, out, err = run_wavg("combine", pattern, "-o", target)
    assert code == 0, err
    assert f"wrote {target}" in out
    index = json.loads(fs.cat(f"{BUCKET}/sharded/out/avg.weights.json"))
    named = {n for v in index["weight_map"].values() for n in (v if isinstance(v, list) else [v])}
    assert names(fs, "sharded/out") == sorted({"avg.weights.json", "avg_00000.weights.h5", *named})
    back = tmp_path / "back"
    fs.get(f"{BUCKET}/sharded/out/", str(back), recursive=True)
    got, want = hm.sharded_tensors(back / "avg.weights.json"), hm.sharded_tensors(local_out)
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    hm.assert_weights_equal(hm.load_weights_into_model(back / "avg.weights.json"), multi.reference)


def test_an_output_to_gs_is_uploaded_whole_and_alone(gcs, runs, tmp_path):
    fs, _ = gcs
    files = runs["mlp"].files["keras"]
    local = tmp_path / "avg.keras"
    assert run_wavg("combine", *files, "-o", local)[0] == 0
    code, out, err = run_wavg("combine", *files, "-o", f"gs://{BUCKET}/out/avg.keras")
    assert code == 0, err
    assert names(fs, "out") == ["avg.keras"]
    assert fs.cat(f"{BUCKET}/out/avg.keras") == local.read_bytes()


def test_a_gs_object_overwritten_while_it_is_read_is_refused(gcs, big_weights, tmp_path):
    fs, recorder = gcs
    files, _ = big_weights
    urls = put(fs, files, "changing")
    victim = f"changing/{files[1].name}"
    fired = threading.Event()

    def overwrite(method, path, span):
        # A tensor read of the victim (not its metadata): replace it by another checkpoint
        # of the same size, so only its generation tells (gcsfs reads are not conditional).
        if method == "GET" and "/download/" in path and path.endswith(victim.replace("/", "%2F")):
            first, last = (int(x) for x in span.split("=")[1].split("-")) if span else (0, 0)
            if last - first + 1 > remote.SMALL_READ and not fired.is_set():
                fired.set()
                fs.put_file(str(files[0]), f"{BUCKET}/{victim}")  # done before this read

    recorder.hook = overwrite
    out = tmp_path / "avg.weights.h5"
    code, _, err = run_wavg("combine", *urls, "-o", out)
    assert fired.is_set()
    assert code == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # after the plan table: refused before the commit
    assert last == f"wavg: error: {urls[1]}: changed while it was being read"
    assert not out.exists()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"gs://{BUCKET}/none/model_1.h5", "no such object"),
        ("gs://no-such-bucket-wavg/run/model_1.h5", "no such bucket"),
        (f"gs://{BUCKET}/none/model_*.h5", "no object matches"),
    ],
)
def test_a_missing_gs_object_or_bucket_is_one_line_naming_the_url(gcs, tmp_path, url, problem):
    code, _, err = run_wavg("combine", url, "-o", tmp_path / "avg.h5")
    assert_one_line_error(code, err, url, problem)
    assert not (tmp_path / "avg.h5").exists()


def test_an_output_to_a_missing_gs_bucket_writes_nothing(gcs, runs, tmp_path):
    files = runs["mlp"].files["h5"]
    target = "gs://no-such-bucket-wavg/avg.h5"
    code, _, err = run_wavg("combine", *files, "-o", target)
    assert_one_line_error(code, err, target, "no such bucket")


@pytest.mark.slow
def test_an_orbax_root_written_to_gs_holds_the_local_average(gcs, orbax_roots, tmp_path):
    """Local Orbax steps, the average written to gs:// (see docs/orbax-buckets.md): the root
    holds the local average's arrays bit for bit, its step marked committed, nothing beside."""
    from support.orbax_runs import array_names, read_array

    fs, _ = gcs
    root = orbax_roots / "jax" / "functional"
    local = tmp_path / "local"
    assert run_wavg("combine", root, "--last", "3", "-o", local)[0] == 0
    target = f"gs://{BUCKET}/orbax/avg"
    code, _, err = run_wavg("combine", root, "--last", "3", "-o", target)
    assert code == 0, err
    fs.invalidate_cache()
    assert all(p.startswith(f"{BUCKET}/orbax/avg/3/") for p in fs.find(f"{BUCKET}/orbax"))
    back = tmp_path / "back"
    fs.get(f"{BUCKET}/orbax/avg/", str(back), recursive=True)
    marker = (back / "3" / "commit_success.txt").read_text()
    assert marker == f"Checkpoint commit was successful to {target}/3"
    names = array_names(local / "3")
    assert array_names(back / "3") == names and names
    for name in names:
        got, want = read_array(back / "3", name), read_array(local / "3", name)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
