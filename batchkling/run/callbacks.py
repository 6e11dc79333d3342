"""The callback receiver: where providers POST task status changes (``provider.callback_url``).

``run``/``resume``/``retry``/``worker --callback-listen HOST:PORT`` start it (a worker's one
receiver serves every run it drives, each under its own token); the manifest's
``provider.callback_url`` is the public URL that reaches it (through whatever proxy or tunnel
the team runs). Each create carries that URL with a token added (``bk=…``, derived from the
run's nonce, so tasks created before a restart still match it).

A callback is only ever a hint (see :mod:`batchkling.run.watch`), and the receiver is built to
be harmless when anyone can reach it:

- bodies above :data:`MAX_BODY` bytes are refused unread (413), as is anything but a POST;
- a request without the run's token is refused (403) before its body is parsed;
- only task ids the run is tracking matter; anything else is acknowledged and dropped;
- the answer is always the same short text: nothing from the request or the run is echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from batchkling.errors import ConfigError
from batchkling.logs import get_logger
from batchkling.providers.base import TaskStatus

#: Largest callback body read (a task object is well under 4 KiB).
MAX_BODY = 64 * 1024
#: The query parameter carrying the run's token.
TOKEN_PARAM = "bk"


def callback_token(nonce: str) -> str:
    """The token a run's callbacks carry: not guessable without the run's nonce."""
    return hashlib.sha256(f"batchkling-callback:{nonce}".encode()).hexdigest()[:32]


def with_token(url: str, token: str) -> str:
    """``url`` with ``bk=<token>`` added to its query (any existing ``bk`` replaced)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k != TOKEN_PARAM]
    query.append((TOKEN_PARAM, token))
    return urlunsplit(parts._replace(query=urlencode(query)))


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) → ``(host, port)``; ConfigError otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--callback-listen {value!r}: expected HOST:PORT, "
                          "e.g. 0.0.0.0:8787")
    return host, int(port)


@dataclass(slots=True)
class _Route:
    """Where one run's callbacks go: its provider's parser and its engine's hint."""

    parse: Callable[[Any], TaskStatus | None]
    on_status: Callable[[TaskStatus], bool]


class CallbackReceiver:
    """A small HTTP server handing parsed callbacks to the run whose token they carry.

    One receiver serves every run of its process (a ``worker`` drives several at once): each
    run adds a route under its token while it runs (:meth:`route`) and takes it away after.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._routes: dict[str, _Route] = {}
        self._runner: web.AppRunner | None = None
        self.received = 0  # accepted callbacks about tasks being tracked
        self.refused = 0  # requests refused (token, size, method, body)
        self.log = get_logger()

    def route(self, token: str, parse: Callable[[Any], TaskStatus | None],
              on_status: Callable[[TaskStatus], bool]) -> None:
        """Hand callbacks carrying ``token`` to ``on_status`` once ``parse`` has read them."""
        self._routes[token] = _Route(parse, on_status)

    def unroute(self, token: str) -> None:
        """Refuse ``token`` from now on (its run ended here)."""
        self._routes.pop(token, None)

    async def start(self) -> None:
        """Listen; ConfigError if the address cannot be bound."""
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"--callback-listen {self.host}:{self.port}: cannot listen "
                              f"there ({exc.strerror or exc})") from exc
        self._runner = runner
        if self.port == 0:
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        self.log.info("callbacks.listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        """Stop listening; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _refuse(self, status: int) -> web.Response:
        self.refused += 1
        return web.Response(status=status, text="refused\n")

    async def _handle(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return self._refuse(405)
        token = request.query.get(TOKEN_PARAM, "")
        route = next((r for known, r in list(self._routes.items())
                      if hmac.compare_digest(token, known)), None)
        if route is None:
            return self._refuse(403)
        if request.content_length is not None and request.content_length > MAX_BODY:
            return self._refuse(413)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(413)
        try:
            payload = json.loads(raw)
            status = route.parse(payload)
        except (ValueError, TypeError, LookupError, AttributeError):
            return self._refuse(400)
        if status is not None and route.on_status(status):
            self.received += 1
        return web.Response(text="ok\n")
