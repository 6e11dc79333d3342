"""Fetching finished videos: untrusted URLs in, verified files out.

A result URL comes from the provider's answer, so it is treated like user input: http(s) only,
no private, loopback or link-local address unless the provider itself lives on that host (the
simulator) or the manifest allows it, every redirect re-checked, and a size cap. The file name
comes from the job id, never from the URL. Bytes go to ``<name>.part``, are fsynced, checked
against ``Content-Length`` and the MP4 ``ftyp`` signature, and only then renamed into place.

Known limit: the address check resolves the host before the transport connects, so a DNS
server that answers differently the second time (rebinding) could slip past it; pinning the
address would need the transport to connect to the address that was checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import anyio
import httpx

from batchkling.errors import DownloadError, UnsafeURL
from batchkling.providers.http import HttpClient

_CHUNK = 1 << 16
_MAX_REDIRECTS = 5
_MAX_URL = 8192
#: A download may take this long to start, and then gets one more second per ``MIN_RATE``
#: bytes received: a CDN that trickles a video a byte a second is abandoned after about a
#: minute instead of holding the run forever (read at download time, so tests may shorten it).
STALL_GRACE = 60.0
MIN_RATE = 32 * 1024
# Bodies that are certainly not a video: an error page served with 200.
_NOT_VIDEO = ("text/", "application/json", "application/xml", "application/xhtml")


class ExpiredURL(DownloadError):
    """The URL answered 403/404/410: ask the provider for a fresh one."""


class TooLarge(DownloadError):
    """The video is over ``output.max_video_mb``: fetching it again would only repeat that."""


class TooSlow(DownloadError):
    """The video arrived slower than :data:`MIN_RATE`: it is left for the next run to fetch."""


@dataclass(frozen=True, slots=True)
class DownloadPolicy:
    """What the downloader may fetch."""

    max_bytes: int = 500 * 1024 * 1024
    allow_private: bool = False
    #: Hosts (as ``host`` or ``host:port``) trusted whatever their address: the provider's own.
    trusted_hosts: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A verified file."""

    path: Path
    size: int
    sha256: str


def _address_is_private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


async def check_url(url: str, policy: DownloadPolicy) -> None:
    """Raise :class:`UnsafeURL` unless ``url`` is one batchkling may fetch."""
    if len(url) > _MAX_URL:
        raise UnsafeURL(f"refused result URL of {len(url):,} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise UnsafeURL(f"refused result URL that does not parse ({exc}): {url[:80]!r}") from exc
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"refused result URL with scheme {parts.scheme or 'none'!r}: only http(s)")
    if not host:
        raise UnsafeURL("refused result URL without a host")
    if host in policy.trusted_hosts or parts.netloc in policy.trusted_hosts:
        return
    if policy.allow_private:
        return
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            infos = await anyio.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise DownloadError(f"cannot resolve result host {host!r}: {exc}") from exc
        addresses = [str(info[4][0]) for info in infos]
    private = [a for a in addresses if _address_is_private(a)]
    if private:
        raise UnsafeURL(
            f"refused result URL on {host!r}: it resolves to a private or local address "
            f"({private[0]}); set output.allow_private_urls to allow it"
        )


async def download(client: HttpClient, url: str, dest: Path,
                   policy: DownloadPolicy) -> Downloaded:
    """Stream ``url`` to ``dest`` atomically and verify it; return its size and sha256."""
    part = dest.with_name(dest.name + ".part")
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        await check_url(current, policy)
        try:
            # identity: the bytes we hash and count are the bytes Content-Length speaks of.
            request = client.build_request("GET", current,
                                           headers={"Accept-Encoding": "identity"})
        except (httpx.InvalidURL, ValueError) as exc:
            raise UnsafeURL(f"refused result URL that does not parse ({exc})") from exc
        try:
            async with client.stream(request) as response:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise DownloadError(f"redirect without a Location from {_host(current)}")
                    current = urljoin(current, location)
                    continue
                if response.status_code in (403, 404, 410):
                    raise ExpiredURL(
                        f"result URL answered HTTP {response.status_code} (expired or gone)"
                    )
                if response.status_code != 200:
                    raise DownloadError(f"result URL answered HTTP {response.status_code}")
                with anyio.CancelScope() as scope:
                    return await _save(response, part, dest, policy, scope)
                raise TooSlow(f"download from {_host(current)} slower than "
                              f"{MIN_RATE // 1024} KiB/s: abandoned; the next run fetches it "
                              "again (no new render)")
        except httpx.HTTPError as exc:
            raise DownloadError(
                f"download from {_host(current)} failed: {type(exc).__name__}"
            ) from exc
    raise UnsafeURL(f"more than {_MAX_REDIRECTS} redirects from {_host(url)}")


def _host(url: str) -> str:
    return urlsplit(url).netloc or url[:60]


def _discard(part: Path) -> None:
    # A leftover .part is harmless (the next attempt truncates it), so failures are ignored.
    with contextlib.suppress(OSError):
        part.unlink()


async def _save(response: httpx.Response, part: Path, dest: Path,
                policy: DownloadPolicy, scope: anyio.CancelScope) -> Downloaded:
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind.startswith(_NOT_VIDEO):
        raise DownloadError(f"result URL served {kind!r}, not a video")
    declared: int | None = None
    if "content-length" in response.headers:
        try:
            declared = int(response.headers["content-length"])
        except ValueError as exc:
            raise DownloadError("result URL sent an unreadable Content-Length") from exc
        if declared > policy.max_bytes:
            raise TooLarge(
                f"result is {declared:,} bytes, over the {policy.max_bytes:,}-byte limit"
            )
    digest = hashlib.sha256()
    size = 0
    head = b""
    try:
        fd = _create(part)
    except OSError as exc:
        raise DownloadError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    # The deadline moves with every chunk: silence and a trickle both end at it.
    start = anyio.current_time() + STALL_GRACE
    scope.deadline = start
    try:
        # Chunks land in the page cache in microseconds; only the disk work at the end is worth
        # a thread.
        with open(fd, "wb") as out:  # noqa: ASYNC230
            async for chunk in response.aiter_bytes(_CHUNK):
                size += len(chunk)
                scope.deadline = start + size / MIN_RATE
                if size > policy.max_bytes:
                    raise TooLarge(
                        f"result exceeded the {policy.max_bytes:,}-byte limit while downloading"
                    )
                if len(head) < 12:
                    head += chunk[: 12 - len(head)]
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            if declared is not None and size != declared:
                raise DownloadError(f"download truncated: got {size:,} of {declared:,} bytes")
            if size < 12 or head[4:8] != b"ftyp":
                raise DownloadError("downloaded file is not an MP4 (no ftyp box at the start)")
            # One trip to a worker thread for all of it: each trip costs more CPU than a job's
            # other bookkeeping, and an fsync must not stall the event loop. No deadline on the
            # disk's own work: a cancelled fsync would leave the rename undecided.
            scope.deadline = math.inf
            await anyio.to_thread.run_sync(_install, out.fileno(), part, dest)
    except BaseException as exc:
        _discard(part)  # nothing is left at dest: the rename is the last step
        if isinstance(exc, OSError):
            raise DownloadError(f"cannot write {dest}: {exc.strerror or exc}") from exc
        raise
    return Downloaded(dest, size, digest.hexdigest())


def _create(part: Path) -> int:
    """Open a new ``part`` exclusively, without following links: the bytes land in this file.

    Usually one system call. A leftover or planted ``.part`` (a symlink, say) is removed and
    the open tried again; a missing folder is made.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(3):
        try:
            return os.open(part, flags, 0o644)
        except FileExistsError:
            _discard(part)
        except FileNotFoundError:
            part.parent.mkdir(parents=True, exist_ok=True)
    return os.open(part, flags, 0o644)


def _install(fd: int, part: Path, dest: Path) -> None:
    """Make the verified bytes durable, then put them at ``dest``.

    The file's data is fsynced before the rename, so ``dest`` never names a partial video, even
    after a power cut. The rename itself is not fsynced (that would cost a journal commit per
    video): the ``downloaded`` state it goes with is a quick commit, and a run resumed after a
    power cut fetches again any video recorded as downloaded whose file is missing.
    """
    os.fsync(fd)
    os.replace(part, dest)
