"""Result downloads: untrusted URLs refused, bodies verified, files atomic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from batchkling.errors import DownloadError, UnsafeURL
from batchkling.providers.http import HttpClient
from batchkling.run.download import DownloadPolicy, ExpiredURL, TooLarge, check_url, download

MP4 = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 2000
POLICY = DownloadPolicy(max_bytes=10_000)


class _Chunks(httpx.AsyncByteStream):
    """A streamed body with no Content-Length, as a server that lies by omission sends it."""

    def __init__(self, chunk: bytes, count: int) -> None:
        self.chunk, self.count = chunk, count

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            yield self.chunk


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> HttpClient:
    return HttpClient(transport=httpx.MockTransport(handler))


class TestURLSafety:
    @pytest.mark.parametrize("url", [
        "file:///etc/passwd",
        "ftp://example.com/x.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:8080/x.mp4",
        "http://[::1]/x.mp4",
        "http://10.0.0.7/x.mp4",
        "http://192.168.1.1/x.mp4",
        "http://[::ffff:127.0.0.1]/x.mp4",
        "http://localhost/x.mp4",
    ])
    async def test_refused(self, url: str) -> None:
        """Non-http(s) schemes and private, loopback and link-local addresses are refused."""
        with pytest.raises(UnsafeURL):
            await check_url(url, POLICY)

    async def test_the_providers_own_host_is_trusted(self) -> None:
        """A simulator on loopback serves its own files."""
        await check_url("http://127.0.0.1:9/x.mp4",
                        DownloadPolicy(trusted_hosts=frozenset({"127.0.0.1"})))

    async def test_manifest_may_allow_private(self) -> None:
        """output.allow_private_urls opens private addresses on purpose."""
        await check_url("http://10.1.2.3/x.mp4", DownloadPolicy(allow_private=True))

    async def test_public_literal_is_allowed(self) -> None:
        """A public address passes."""
        await check_url("https://93.184.215.14/x.mp4", POLICY)


class TestDownload:
    async def test_verified_and_atomic(self, tmp_path: Path) -> None:
        """A good body lands at the final path with its size and sha256; no .part remains."""
        client = _client(lambda r: httpx.Response(200, content=MP4,
                                                  headers={"content-type": "video/mp4"}))
        result = await download(client, "https://93.184.215.14/v.mp4", tmp_path / "a.mp4",
                                POLICY)
        assert result.size == len(MP4) and (tmp_path / "a.mp4").read_bytes() == MP4
        assert not list(tmp_path.glob("*.part"))

    async def test_a_planted_part_link_is_replaced_and_a_missing_folder_made(
            self, tmp_path: Path) -> None:
        """A .part left as a symlink is removed, not written through; the videos folder is
        made when it is missing (deleted during a run, say)."""
        client = _client(lambda r: httpx.Response(200, content=MP4,
                                                  headers={"content-type": "video/mp4"}))
        target = tmp_path / "elsewhere"
        target.write_bytes(b"keep me")
        (tmp_path / "a.mp4.part").symlink_to(target)
        await download(client, "https://93.184.215.14/v.mp4", tmp_path / "a.mp4", POLICY)
        assert target.read_bytes() == b"keep me"
        assert (tmp_path / "a.mp4").read_bytes() == MP4
        assert not (tmp_path / "a.mp4.part").is_symlink()

        deep = tmp_path / "gone" / "videos" / "b.mp4"
        await download(client, "https://93.184.215.14/v.mp4", deep, POLICY)
        assert deep.read_bytes() == MP4 and not list(deep.parent.glob("*.part"))

    @pytest.mark.parametrize(("response", "message", "too_large"), [
        (httpx.Response(200, content=MP4[:100], headers={"content-length": str(len(MP4))}),
         "truncated", False),
        (httpx.Response(200, content=b"<html>oops</html>",
                        headers={"content-type": "text/html"}), "not a video", False),
        (httpx.Response(200, content=b"x" * 20, headers={"content-length": "10000000000"}),
         "over the", True),
        (httpx.Response(200, stream=_Chunks(b"\x00" * 1000, 20)), "exceeded", True),
        (httpx.Response(200, content=b"\x00" * 100), "not an MP4", False),
        (httpx.Response(500), "HTTP 500", False),
    ])
    async def test_bad_bodies_are_refused(self, tmp_path: Path, response: httpx.Response,
                                          message: str, too_large: bool) -> None:
        """Truncated, HTML, oversized (declared or streamed), non-MP4 and 5xx bodies fail
        with a reason, and nothing is left at the final path. Only the oversized ones are
        TooLarge, which the engine does not try again."""
        client = _client(lambda r: response)
        with pytest.raises(DownloadError, match=message) as caught:
            await download(client, "https://93.184.215.14/v.mp4", tmp_path / "a.mp4", POLICY)
        assert isinstance(caught.value, TooLarge) is too_large
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize("status", [403, 404, 410])
    async def test_expired(self, tmp_path: Path, status: int) -> None:
        """403/404/410 ask for a fresh URL."""
        with pytest.raises(ExpiredURL):
            await download(_client(lambda r: httpx.Response(status)),
                           "https://93.184.215.14/v.mp4", tmp_path / "a.mp4", POLICY)

    async def test_redirect_to_loopback_is_refused(self, tmp_path: Path) -> None:
        """Every redirect hop is re-checked: a public URL cannot bounce us to loopback."""
        requested: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            requested.append(str(request.url))
            return httpx.Response(302, headers={"location": "http://127.0.0.1/secret"})

        with pytest.raises(UnsafeURL):
            await download(_client(handler), "https://93.184.215.14/v.mp4",
                           tmp_path / "a.mp4", POLICY)
        assert requested == ["https://93.184.215.14/v.mp4"]

    async def test_disk_full_is_a_download_error(self, tmp_path: Path) -> None:
        """A folder that is a file (or a full disk) is a clear download error."""
        blocker = tmp_path / "videos"
        blocker.write_text("not a folder")
        client = _client(lambda r: httpx.Response(200, content=MP4))
        with pytest.raises(DownloadError, match="cannot write"):
            await download(client, "https://93.184.215.14/v.mp4", blocker / "a.mp4", POLICY)
