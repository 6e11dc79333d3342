"""HTTP for the providers and the downloader: httpx's request and response types, sent straight
to a transport.

Through ``httpx.AsyncClient`` a request cost about 1 ms of CPU on the 2-core build VM — most of
a job's budget, with four requests per job. Two layers made that: the client's per-request
machinery (URL merging, a cookie jar, auth and redirect generators) and httpcore's pure-Python
HTTP/1.1 stack. :class:`HttpClient` keeps httpx's types, so tests and library users inject any
``httpx.AsyncBaseTransport`` (``MockTransport``, ``ASGITransport``) as before, but builds each
request once and hands it to the transport itself; what it leaves out (cookies, auth flows,
following redirects) batchkling never used. Without an injected transport it sends through
:class:`AiohttpTransport`: aiohttp's HTTP/1.1 client, whose parser is C, behind httpx's
transport interface. Figures: ``docs/benchmarks.md``.

Errors keep httpx's meaning, which exactly-once rests on (``providers.base.send``):
``ConnectError`` and ``ConnectTimeout`` only when no byte of the request can have left the
machine, and a read error or timeout for everything after. (The ``httpx-aiohttp`` package maps
a dropped connection to ``ConnectTimeout``, which would make a create whose answer was lost
look safe to send again: that is why this adapter is batchkling's own.)

Every exchange through :meth:`HttpClient.send` is bounded twice: in time — a total deadline
covering connect, first byte and the whole body, so a provider that trickles its answer a byte
a second cannot hold a run forever (an idle timeout alone never fires on it) — and in size — an
answer over :data:`MAX_ANSWER_BYTES`, compressed or not, is refused before it is held in memory.
Both surface as httpx errors of the "after sending" kind: for a create they are ambiguous.
"""

from __future__ import annotations

import functools
import ssl
import urllib.request
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiohttp
import anyio
import httpx

USER_AGENT = "batchkling/0.1"
_CHUNK = 1 << 16
_MAX_URLS = 4096
#: A provider's JSON answer has no business being larger; a bigger one is refused unread.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
#: Seconds an exchange through :meth:`HttpClient.send` may take in all, when the client names no
#: deadline of its own (read at send time, so tests may shorten it).
REQUEST_DEADLINE = 120.0
#: An upload (a create carrying a 10 MB image) gets this many bytes a second on top of it.
_MIN_UPLOAD_RATE = 64 * 1024


class AnswerTooLarge(httpx.TransportError):
    """The answer was over the size limit; it was not read whole."""


class HttpClient:
    """Builds requests with shared headers and timeouts and sends them through one transport.

    Use as ``async with``, or call :meth:`aclose`. Redirects are never followed and no cookies
    are kept; a response from :meth:`send` has its body read.
    """

    def __init__(
        self,
        *,
        base_url: str = "",
        headers: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 64,
        deadline: float | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._deadline = deadline
        self._max_answer = max_answer_bytes
        self._headers = httpx.Headers({"Accept": "*/*", "Accept-Encoding": "gzip, deflate",
                                       "User-Agent": USER_AGENT, **(headers or {})})
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout).as_dict()
        # Parsed URLs by text: httpx validates a URL character by character, and a task is
        # polled at the same URL several times.
        self._urls: dict[str, httpx.URL] = {}
        self._transport = transport or AiohttpTransport(max_connections=max_connections)
        self._closed = False

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the transport; idempotent."""
        if not self._closed:
            self._closed = True
            await self._transport.aclose()

    def build_request(self, method: str, url: str, *, json: Any = None,
                      headers: Mapping[str, str] | None = None) -> httpx.Request:
        """A request for ``url``: absolute, or a path below the base URL."""
        if self._closed:
            raise RuntimeError("this HTTP client is closed")
        text = url if "://" in url else self._base + url
        target = self._urls.get(text)
        if target is None:
            if len(self._urls) >= _MAX_URLS:
                self._urls.clear()
            target = self._urls[text] = httpx.URL(text)
        merged = self._headers
        if headers:
            merged = merged.copy()
            merged.update(headers)
        return httpx.Request(method, target, headers=merged, json=json,
                             extensions={"timeout": self._timeout})

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and read the whole answer, within the deadline and the size limit.

        Past the deadline this raises :class:`httpx.ReadTimeout`; an answer over the limit
        raises :class:`AnswerTooLarge` — both "the request may have reached the server".
        """
        seconds = REQUEST_DEADLINE if self._deadline is None else self._deadline
        with suppress(httpx.RequestNotRead):
            seconds += len(request.content) / _MIN_UPLOAD_RATE
        try:
            with anyio.fail_after(seconds):
                if isinstance(self._transport, AiohttpTransport):
                    # The body in one read, without httpx's async byte-stream machinery.
                    return await self._transport.fetch(request, self._max_answer)
                return await self._read_whole(request)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"no complete answer within {seconds:.0f} s",
                                    request=request) from exc

    async def _read_whole(self, request: httpx.Request) -> httpx.Response:
        async with self.stream(request) as response:
            try:
                content = response.content  # an in-memory answer (MockTransport) is read already
            except httpx.ResponseNotRead:
                pass
            else:
                if len(content) > self._max_answer:
                    raise _too_large(len(content), self._max_answer)
                return response
            limit = self._max_answer
            body = await _read_bounded(response.aiter_raw(), _length(response.headers), limit)
        headers, body = _decode_bounded(response.headers.raw, body, limit)
        return httpx.Response(status_code=response.status_code, headers=headers, content=body,
                              request=request, extensions=response.extensions)

    @asynccontextmanager
    async def stream(self, request: httpx.Request) -> AsyncIterator[httpx.Response]:
        """Send ``request``; the body is read by the caller and released on exit."""
        response = await self._transport.handle_async_request(request)
        response.request = request
        try:
            yield response
        finally:
            await response.aclose()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends through an :class:`aiohttp.ClientSession`.

    The session is made on first use, inside the running event loop. Keep-alive connections
    expire after ``keepalive_expiry`` seconds, as httpx's do. Proxies from the environment
    (``HTTPS_PROXY`` …) are honoured, as httpx honours them; TLS is verified against the
    certificates httpx uses.
    """

    def __init__(self, *, max_connections: int = 64, keepalive_expiry: float = 5.0) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None
        # Now, not at the first request: loading the CA bundle takes tens of milliseconds that
        # would otherwise land inside a run's first create.
        self._ssl = _ssl_context()
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._max_connections,
                                         keepalive_timeout=self._keepalive_expiry,
                                         ssl=self._ssl)
        # Reading the proxy settings on every request costs more than the request itself, so
        # the environment is asked once; without a proxy there is nothing to look up.
        proxied = any(urllib.request.getproxies())
        # No cookie jar: providers set no cookie batchkling needs, and a jar costs time per
        # request. Bodies are decoded by httpx, as they were before.
        self._session = aiohttp.ClientSession(connector=connector, trust_env=proxied,
                                              auto_decompress=False,
                                              cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    def _timeout(self, extensions: Mapping[str, Any]) -> aiohttp.ClientTimeout:
        spec = extensions.get("timeout") or {}
        key = (spec.get("pool"), spec.get("connect"), spec.get("read"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            # aiohttp's `connect` covers waiting for a pooled connection, like httpx's `pool`.
            timeout = aiohttp.ClientTimeout(total=None, connect=key[0], sock_connect=key[1],
                                            sock_read=key[2])
            self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        answer = await self._send(request)
        return httpx.Response(status_code=answer.status, headers=answer.raw_headers,
                              stream=_Body(answer), request=request, extensions=_extensions(answer))

    async def fetch(self, request: httpx.Request,
                    limit: int = MAX_ANSWER_BYTES) -> httpx.Response:
        """Send ``request`` and read the whole body, at most ``limit`` bytes of it (else
        :class:`AnswerTooLarge`); the connection goes back to the pool."""
        answer = await self._send(request)
        whole = False
        try:
            body = await _read_bounded(answer.content.iter_any(), answer.content_length, limit)
            whole = True
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _translate(exc) from exc
        finally:
            if whole:
                answer.release()
            else:
                answer.close()  # the rest of an answer cut short must not reach the next request
        # Decoded here, within the limit (httpx would inflate a gzip bomb whole).
        headers, body = _decode_bounded(answer.raw_headers, body, limit)
        return httpx.Response(status_code=answer.status, headers=headers,
                              content=body, request=request, extensions=_extensions(answer))

    async def _send(self, request: httpx.Request) -> aiohttp.ClientResponse:
        session = self._session or self._open()
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        try:
            return await session.request(
                request.method, str(request.url), headers=request.headers.multi_items(),
                data=body or None, allow_redirects=False, timeout=self._timeout(request.extensions),
                skip_auto_headers=_OWN_HEADERS,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _translate(exc) from exc

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _too_large(size: int, limit: int) -> AnswerTooLarge:
    return AnswerTooLarge(f"the answer is over {limit // (1024 * 1024)} MB ({size:,} bytes "
                          "or more); a provider's JSON is never that large")


def _length(headers: httpx.Headers) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


async def _read_bounded(chunks: AsyncIterator[bytes], declared: int | None, limit: int) -> bytes:
    """The body from ``chunks``, refused as soon as it is known to be over ``limit``."""
    if declared is not None and declared > limit:
        raise _too_large(declared, limit)
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _decode_bounded(headers: Iterable[tuple[bytes, bytes]], body: bytes,
                    limit: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Inflate a gzip or deflate body up to ``limit`` bytes; the headers then say identity.

    An encoding batchkling did not ask for and cannot bound (br, zstd) is left as it came: the
    JSON reader then finds it unreadable, which is what it is.
    """
    kept: list[tuple[bytes, bytes]] = []
    encoding = ""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-encoding":
            encoding = value.decode("latin-1").strip().lower()
        elif lowered != b"content-length":
            kept.append((name, value))
    if encoding in ("", "identity"):
        return kept, body
    if encoding in ("gzip", "x-gzip", "deflate"):
        # "deflate" is zlib-wrapped by the standard and raw by some servers: try both.
        tries = [16 + zlib.MAX_WBITS] if encoding != "deflate" else [zlib.MAX_WBITS,
                                                                     -zlib.MAX_WBITS]
        for wbits in tries:
            inflater = zlib.decompressobj(wbits)
            try:
                inflated = inflater.decompress(body, limit + 1)
                break
            except zlib.error as exc:
                error = exc
        else:
            raise httpx.DecodingError(f"cannot decode the {encoding} answer: {error}")
        if len(inflated) > limit or inflater.unconsumed_tail:
            raise _too_large(len(inflated), limit)
        body = inflated
    return kept, body


def _extensions(answer: aiohttp.ClientResponse) -> dict[str, Any]:
    return {"http_version": b"HTTP/1.1",
            "reason_phrase": (answer.reason or "").encode("latin-1", "replace")}


class _Body(httpx.AsyncByteStream):
    def __init__(self, answer: aiohttp.ClientResponse) -> None:
        self._answer = answer

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._answer.content.iter_chunked(_CHUNK):
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _translate(exc) from exc

    async def aclose(self) -> None:
        # Back to the pool when the body was read whole; closed otherwise.
        self._answer.release()


# httpx's request already carries these (or chose to leave them out): aiohttp adds none.
_OWN_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle takes tens of milliseconds: once per process, not per client.
    return httpx.create_ssl_context()


def _translate(exc: BaseException) -> httpx.TransportError:
    """The httpx error with the same meaning for exactly-once (see the module docstring)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(text)  # DNS, refused, TLS handshake: nothing was sent
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(text)  # no pooled connection or no connect in time
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout(text)
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return httpx.UnsupportedProtocol(text)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(text)
    return httpx.ReadError(text)  # the request may have reached the server
