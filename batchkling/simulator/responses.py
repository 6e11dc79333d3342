"""Response helpers: compact JSON, and answers that break off on purpose."""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class SimulatedDrop(httpx.RemoteProtocolError):
    """Raised after part of a response so the connection closes mid-answer.

    It subclasses httpx's own transport error so that an in-process client
    (``httpx.ASGITransport`` re-raises app exceptions) sees what a client of the real server sees.
    """

    def __init__(self, message: str = "simulated connection drop") -> None:
        super().__init__(message)


def json_bytes(data: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer without Starlette's per-call checks (this is the hot path)."""
    return Response(json_bytes(data), status_code=status, headers=headers,
                    media_type="application/json")


class BrokenResponse(Response):
    """Promises the whole body in Content-Length, sends the first ``keep`` bytes, then drops."""

    def __init__(self, body: bytes, keep: int, *, status: int = 200, media_type: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(body, status_code=status, headers=headers, media_type=media_type)
        self.keep = keep

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the start and a prefix of the body, then raise so the server closes the socket."""
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: self.keep],
                    "more_body": True})
        raise SimulatedDrop()


def dropped_json(data: Any) -> Response:
    """Headers and half of a JSON body, then a closed connection."""
    body = json_bytes(data)
    return BrokenResponse(body, len(body) // 2, media_type="application/json")


async def hold(request: Request, seconds: float) -> None:
    """Wait up to ``seconds`` real seconds, less if the client hangs up first (it timed out)."""
    deadline = anyio.current_time() + seconds
    while (left := deadline - anyio.current_time()) > 0:
        await anyio.sleep(min(left, 0.1))
        if await request.is_disconnected():
            return


def base_url(request: Request) -> str:
    """This server's origin as the client addressed it, so result URLs work on any port."""
    host = request.headers.get("host") or "localhost"
    return f"{request.scope.get('scheme', 'http')}://{host}"


def bearer(request: Request) -> str | None:
    """The bearer token from Authorization, or None when absent or empty."""
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds when whole, else a decimal (clients parse floats)."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


async def read_json(request: Request) -> Any:
    """The request body as JSON, or raise ValueError."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"body is not valid JSON: {exc}") from exc


class DropLogFilter(logging.Filter):
    """Keeps uvicorn from logging a traceback for each connection dropped on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for records about a deliberate drop."""
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SimulatedDrop)


def install_drop_filter() -> None:
    """Attach ``DropLogFilter`` to uvicorn's error logger once."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DropLogFilter) for f in logger.filters):
        logger.addFilter(DropLogFilter())
