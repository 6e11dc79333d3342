"""The HTTP layer: batchkling's aiohttp transport behind httpx's types, on real loopback sockets.

Exactly-once rests on one distinction this layer must keep: a failure before any byte of a
request left (safe to send again) against one after (the create may exist).
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from batchkling.errors import AmbiguousCreate, TransientError
from batchkling.models import JobSpec
from batchkling.providers.http import AiohttpTransport, HttpClient
from batchkling.providers.imarouter import ImaRouterProvider
from batchkling.run.download import DownloadPolicy, download

KEY = "sk-http-test-0000000000"
MP4 = b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4096  # about 1 MB



def spec_for(job_id: str, prompt: str = "a cat") -> JobSpec:
    return JobSpec(job_id=job_id, model="kling-v2-6", prompt=prompt, duration=5, size="16:9")


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A loopback TCP server running ``handler`` per connection; yields its base URL."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0].encode(), headers, body


def _answer(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers, "", ""]
    return "\r\n".join(head).encode("latin-1") + body


def answers_once(answer: bytes) -> Handler:
    """A handler that reads one request, sends ``answer`` and hangs up."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    return handler


@asynccontextmanager
async def provider_at(base_url: str, seconds: float = 5.0) -> AsyncIterator[ImaRouterProvider]:
    """An ImaRouter adapter on the default transport, closed afterwards."""
    provider = ImaRouterProvider(base_url, KEY, timeout=seconds)
    try:
        yield provider
    finally:
        await provider.aclose()


class TestExactlyOnceErrors:
    async def test_refused_connection_is_safe_to_retry(self) -> None:
        """Nothing listening: the create raises TransientError (nothing sent), not ambiguous."""
        async with raw_server(lambda r, w: asyncio.sleep(0)) as url:
            pass  # the port is closed again: connections are refused
        async with provider_at(url) as provider:
            with pytest.raises(TransientError):
                await provider.create(spec_for("a"), "bk-key-1")

    async def test_connection_dropped_after_the_request_is_ambiguous(self) -> None:
        """The server read the create and hung up: the task may exist, so AmbiguousCreate."""
        seen: list[bytes] = []

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line, _headers, _body = await _read_request(reader)
            seen.append(line)
            writer.close()

        async with raw_server(hang_up) as url, provider_at(url) as provider:
            with pytest.raises(AmbiguousCreate):
                await provider.create(spec_for("a"), "bk-key-1")
            with pytest.raises(TransientError):
                await provider.status("task-1", spec_for("a"))
        # The create was sent exactly once: a POST is never repeated on a dropped connection.
        assert seen.count(b"POST /v1/videos HTTP/1.1") == 1

    async def test_no_answer_in_time_is_ambiguous(self) -> None:
        """A create whose answer does not come before the read timeout is ambiguous."""
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            await asyncio.sleep(5)
            writer.close()

        async with raw_server(silent) as url, provider_at(url, seconds=0.3) as provider:
            with pytest.raises(AmbiguousCreate, match="ReadTimeout"):
                await provider.create(spec_for("a"), "bk-key-1")

    async def test_truncated_body_is_ambiguous(self) -> None:
        """An answer cut short of its Content-Length is not read as a task."""
        async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"id\": ")
            await writer.drain()
            writer.close()

        async with raw_server(short) as url, provider_at(url) as provider:
            with pytest.raises(AmbiguousCreate):
                await provider.create(spec_for("a"), "bk-key-1")


class TestRequests:
    async def test_create_and_poll_carry_key_headers_and_body(self) -> None:
        """Auth, Idempotency-Key and the JSON body arrive; answers are parsed; one connection."""
        requests: list[tuple[bytes, dict[str, str], bytes]] = []
        connections = 0

        async def api(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            while True:
                try:
                    request = await _read_request(reader)
                except asyncio.IncompleteReadError:
                    writer.close()
                    return
                requests.append(request)
                task = {"id": "task-9", "status": "in_progress", "progress": "40%"}
                writer.write(_answer("200 OK", json.dumps(task).encode(),
                                     "Content-Type: application/json"))
                await writer.drain()

        async with raw_server(api) as url, provider_at(url) as provider:
            task_id = await provider.create(spec_for("a", prompt="a quiet harbour"),
                                            "bk-key-7")
            status = await provider.status(task_id, spec_for("a"))
        assert task_id == "task-9" and status.progress == 40.0
        (line, headers, body), (poll_line, poll_headers, _) = requests
        assert line == b"POST /v1/videos HTTP/1.1"
        assert headers["authorization"] == f"Bearer {KEY}"
        assert headers["idempotency-key"] == "bk-key-7"
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"].startswith("batchkling/")
        assert json.loads(body)["prompt"] == "a quiet harbour"
        assert poll_line == b"GET /v1/videos/task-9 HTTP/1.1"
        assert "idempotency-key" not in poll_headers
        assert connections == 1  # keep-alive

    async def test_redirects_are_not_followed(self) -> None:
        """A redirect comes back as it is; where to go is the caller's decision."""
        redirect = answers_once(_answer("302 Found", b"", "Location: http://127.0.0.1:9/elsewhere"))

        async with raw_server(redirect) as url, HttpClient(base_url=url) as client:
            response = await client.send(client.build_request("GET", "/x"))
        assert response.status_code == 302
        assert response.headers["location"] == "http://127.0.0.1:9/elsewhere"

    async def test_gzip_answers_are_decoded(self) -> None:
        """A gateway that gzips its JSON is read the same as one that does not."""
        body = gzip.compress(b'{"id": "t-1", "status": "queued"}')
        zipped = answers_once(_answer("200 OK", body, "Content-Encoding: gzip",
                                      "Content-Type: application/json"))

        async with raw_server(zipped) as url, HttpClient(base_url=url) as client:
            response = await client.send(client.build_request("GET", "/v1/videos/t-1"))
        assert response.json() == {"id": "t-1", "status": "queued"}

    async def test_a_closed_client_refuses_requests(self) -> None:
        """After aclose, building a request is an error, and aclose may be called again."""
        client = HttpClient(base_url="http://127.0.0.1:9")
        await client.aclose()
        await client.aclose()
        with pytest.raises(RuntimeError):
            client.build_request("GET", "/x")


class TestStreamedDownload:
    async def test_large_body_streams_to_a_verified_file(self, tmp_path: Path) -> None:
        """A 1 MB video arrives in chunks through the transport, whole and hashed."""
        async def video(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _line, headers, _ = await _read_request(reader)
            assert headers["accept-encoding"] == "identity"
            writer.write(_answer("200 OK", MP4, "Content-Type: video/mp4"))
            await writer.drain()
            writer.close()

        policy = DownloadPolicy(trusted_hosts=frozenset({"127.0.0.1"}))
        async with raw_server(video) as url, HttpClient() as client:
            result = await download(client, f"{url}/v.mp4", tmp_path / "v.mp4", policy)
        assert result.size == len(MP4)
        assert (tmp_path / "v.mp4").read_bytes() == MP4
        assert not (tmp_path / "v.mp4.part").exists()


class TestTransport:
    async def test_works_as_a_plain_httpx_transport(self) -> None:
        """httpx.AsyncClient may use it too (a library user's own client, say)."""
        api = answers_once(_answer("201 Created", b"made", "Content-Type: text/plain"))

        async with raw_server(api) as url, httpx.AsyncClient(
                transport=AiohttpTransport()) as client:
            response = await client.post(f"{url}/things", content=b"x")
        assert response.status_code == 201
        assert response.text == "made"
        assert response.extensions["reason_phrase"] == b"Created"
