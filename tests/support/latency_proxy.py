"""A TCP proxy on 127.0.0.1 that makes a local S3 server look far away: a delay per round trip.

Every connection to the proxy is forwarded to the upstream endpoint (the moto server); each
request/response turn (the client speaking after the server spoke, or first) waits `delay`
seconds before its request goes on, and the bytes served can share one rate-limited link.
It records every turn, so a test can count how many round trips a run needed one after
another (`sequential`), and it can cut the link after a chosen request (an outage). It knows
HTTP only well enough to name a request by its first line; it never changes a byte.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]\r\n")


@dataclass
class Turn:
    """One request and its response on one connection: when the request arrived at the
    proxy, when the last response byte left it, the request line's method and path, and the
    response's bytes (headers included)."""

    start: float
    end: float
    method: str
    path: str
    served: int = 0


class LatencyProxy:
    """Forward ``127.0.0.1:<port>`` to `upstream` (``http://host:port``) with `delay` seconds
    per round trip and, if `rate` (bytes per second) is set, one shared link for the bytes
    served. Use as a context manager; `url` is the endpoint to give clients."""

    def __init__(self, upstream: str, delay: float = 0.0, rate: float | None = None) -> None:
        host, port = upstream.split("://", 1)[-1].rstrip("/").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.delay = delay
        self.rate = rate
        self.turns: list[Turn] = []
        self.outage: Callable[[str, str], bool] | None = None
        self._down = False
        self._lock = threading.Lock()
        self._link_free = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.url = ""

    # -- what a test reads ---------------------------------------------------------------

    def reset(self) -> None:
        """Forget the turns seen so far and end any outage."""
        with self._lock:
            self.turns.clear()
            self._down = False
            self.outage = None

    def sequential(self) -> int:
        """The longest chain of turns each of which began after the previous one ended: the
        round trips a run waited for one after another (concurrent turns share a step)."""
        with self._lock:
            turns = sorted(self.turns, key=lambda t: t.start)
        depth: list[int] = []
        for i, turn in enumerate(turns):
            before = [depth[j] for j in range(i) if turns[j].end <= turn.start]
            depth.append(1 + max(before, default=0))
        return max(depth, default=0)

    def cut_after(self, predicate: Callable[[str, str], bool]) -> None:
        """From the first request for which ``predicate(method, path)`` holds, every later
        request finds the link down (its connection closed unanswered); that request's own
        response still arrives."""
        with self._lock:
            self.outage = predicate

    # -- running ----------------------------------------------------------------------------

    def __enter__(self) -> LatencyProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self._server = future.result(10)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _serve(self, client_r, client_w) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        current: list[Turn | None] = [None]  # the turn whose response is being forwarded
        tasks = [
            asyncio.create_task(self._requests(client_r, server_w, client_w, current)),
            asyncio.create_task(self._responses(server_r, client_w, current)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for writer in (client_w, server_w):
            writer.close()

    async def _requests(self, client_r, server_w, client_w, current) -> None:
        while data := await client_r.read(1 << 16):
            turn = current[0]
            found = _REQUEST_LINE.match(data)
            # A new turn: a request line after the server spoke (not a body after its 100).
            if found and (turn is None or turn.end > turn.start):
                method, path = found[1].decode(), found[2].decode()
                with self._lock:
                    if self._down:
                        client_w.transport.abort()
                        return
                    if self.outage is not None and self.outage(method, path):
                        self._down = True
                    turn = Turn(time.monotonic(), 0.0, method, path)
                    self.turns.append(turn)
                current[0] = turn
                if self.delay:
                    await asyncio.sleep(self.delay)
            server_w.write(data)
            await server_w.drain()

    async def _responses(self, server_r, client_w, current) -> None:
        while data := await server_r.read(1 << 16):
            if self.rate:
                now = time.monotonic()
                with self._lock:
                    self._link_free = max(now, self._link_free) + len(data) / self.rate
                    wait = self._link_free - now
                await asyncio.sleep(wait)
            client_w.write(data)
            await client_w.drain()
            turn = current[0]
            if turn is not None and not data.startswith(b"HTTP/1.1 100 "):
                turn.end = time.monotonic()
                turn.served += len(data)
