"""A real HTTP S3 endpoint for the remote tests: moto's standalone server, recorded.

The server runs in the test process on 127.0.0.1 with dummy credentials; its WSGI app is
wrapped so the tests see every request (and the bytes served), and can inject server errors,
deny access or overwrite an object while wavg reads it.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

BUCKET = "wavg-test"
SECRET = "sEcReT-key-value-0123456789"


def unused_endpoint() -> str:
    """An http:// endpoint on 127.0.0.1 where nobody listens (a port just released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


class Recorder:
    """WSGI middleware around moto: logs requests, counts bytes served, injects faults."""

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, int]] = []  # (method, path, body bytes served)
        self.failures = 0  # answer this many requests under `fail_prefix` with a 500
        self.fail_prefix = "/"
        # hook(method, path, environ) before a request is served; False drops it (a 500)
        self.hook = None
        self.active = 0  # requests being served now
        self.idle = threading.Condition(self.lock)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until no request is being served (a killed client's last ones included)."""
        with self.idle:
            assert self.idle.wait_for(lambda: self.active == 0, timeout), "server stays busy"

    def __call__(self, environ, start_response):
        with self.lock:
            self.active += 1
        try:
            return self._serve(environ, start_response)
        finally:
            with self.idle:
                self.active -= 1
                self.idle.notify_all()

    def _serve(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if "Credential=DENIED" in environ.get("HTTP_AUTHORIZATION", ""):
            return self._error(start_response, "403 Forbidden", "AccessDenied", method)
        with self.lock:
            inject = self.failures > 0 and path.startswith(self.fail_prefix)
            if inject:
                self.failures -= 1
        if inject:
            return self._error(start_response, "500 Internal Server Error", "InternalError", method)
        if self.hook is not None and self.hook(method, path, environ) is False:
            return self._error(start_response, "500 Internal Server Error", "InternalError", method)
        body = self.app(environ, start_response)
        try:
            data = b"".join(body)
        finally:
            getattr(body, "close", lambda: None)()
        with self.lock:
            self.log.append((method, path, len(data) if method == "GET" else 0))
        return [data]

    @staticmethod
    def _error(start_response, status: str, code: str, method: str):
        body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
        if method == "HEAD":  # a HEAD answer has headers only
            body = b""
        start_response(
            status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        )
        return [body]

    def served(self, prefix: str) -> tuple[int, int]:
        """(reads: GET and HEAD requests, GET body bytes) for objects under `/bucket/prefix`."""
        hits = [
            n
            for m, p, n in self.log
            if m in ("GET", "HEAD") and p.startswith(f"/{BUCKET}/{prefix}")
        ]
        return len(hits), sum(hits)


def put(client, files, prefix: str) -> list[str]:
    for path in files:
        client.upload_file(str(path), BUCKET, f"{prefix}/{Path(path).name}")
    return [f"s3://{BUCKET}/{prefix}/{Path(p).name}" for p in files]


def get(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def keys(client, prefix: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))
