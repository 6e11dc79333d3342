"""A tiny hostile HTTP server on loopback, for faults that need a real socket.

The simulator speaks the providers' shapes faithfully; this one says whatever a test tells it,
as slowly as it is told: ``HostileServer(app)`` calls ``app(request)`` for every request, in a
thread of its own, and sends the :class:`Reply` it returns — all at once, or ``trickle`` seconds
per byte, or as a ``stream`` of chunks (each counted, so a test can see how much a client read
before it stopped). The CLI in a subprocess can be pointed at it like at any provider.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    """What the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Reply:
    """What to send back; ``stream`` chunks go out one by one (no Content-Length)."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    trickle: float | None = None  # seconds between bytes
    stream: Iterable[bytes] | None = None

    @classmethod
    def json(cls, data: Any, status: int = 200, **headers: str) -> Reply:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json",
                                                       **headers})


App = Callable[[Request], Reply]


class HostileServer:
    """``with HostileServer(app) as server:`` serves ``app`` at ``server.url`` until exit."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.requests: list[Request] = []
        self.streamed = 0  # bytes of ``stream`` replies the clients took
        self._lock = threading.Lock()
        self._stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                request = Request(self.command, self.path,
                                  {k.lower(): v for k, v in self.headers.items()},
                                  self.rfile.read(length))
                with owner._lock:
                    owner.requests.append(request)
                reply = owner.app(request)
                try:
                    owner._send(self, reply)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _send(self, handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        handler.send_response(reply.status)
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        if reply.stream is not None:
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.close_connection = True
            for chunk in reply.stream:
                if self._stop.is_set():
                    return
                handler.wfile.write(chunk)
                with self._lock:
                    self.streamed += len(chunk)
            return
        handler.send_header("Content-Length", str(len(reply.body)))
        handler.end_headers()
        if reply.trickle is None:
            handler.wfile.write(reply.body)
            return
        for i in range(len(reply.body)):
            if self._stop.wait(reply.trickle):
                return
            handler.wfile.write(reply.body[i:i + 1])
            handler.wfile.flush()

    def of(self, method: str, prefix: str = "") -> list[Request]:
        """The requests with this method whose path starts with ``prefix``."""
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Block until ``predicate()`` (polled every 10 ms), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)
