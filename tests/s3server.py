"""A real S3-compatible server for tests: moto's standalone S3 server on loopback.

Load the fixtures as a plugin -- in ``tests/conftest.py`` (or a test module)::

    pytest_plugins = ["s3server"]

(the ``tests`` directory is on ``sys.path`` the same way ``invariants`` is). Importing the
fixtures by name also works but trips ruff's F811 at every use. Helpers and classes are
imported normally: ``from s3server import FaultProxy, make_bucket``.

Fixtures
--------
``s3_server`` (session)
    A :class:`MotoS3Server`; ``.endpoint_url`` is ``http://127.0.0.1:<port>``.
``s3_bucket`` (function)
    ``(endpoint_url, bucket_name)`` of a fresh, empty bucket with a unique name.
``s3_env`` (function)
    Puts fake credentials, region and ``AWS_ENDPOINT_URL`` into ``os.environ`` through
    ``monkeypatch`` (undone after the test) and returns them as a dict. Nothing else in
    this module touches the environment.
``s3_fault_proxy`` (function)
    A :class:`FaultProxy` in front of the session server: point the code under test at
    ``proxy.endpoint_url`` and call ``fail_next(2)`` (5xx), ``drop_next(1)`` (connection
    closed, no response), ``delay_next(1, 2.0)``, ``corrupt_next(1)`` (flip a body byte).

Helpers
-------
:func:`make_bucket` creates buckets (optionally write-denied, see :func:`deny_writes`);
:func:`enable_iam_auth` turns a *dedicated* server into one that checks SigV4 signatures.

Why a subprocess and not ``moto.server.ThreadedMotoServer`` in the test process
-------------------------------------------------------------------------------
* **No leaks.** The child runs ``ThreadedMotoServer`` and blocks reading its stdin; it
  exits as soon as that pipe reaches EOF, which the kernel guarantees when the test
  process ends for *any* reason (``-x``, xdist worker crash, ``SIGKILL``, timeout).
  A thread in the test process dies with it too, but a hung request thread cannot be
  stopped, and moto's state (``settings``, backends) is then shared with the tests.
  (Caveat: a child made with bare ``os.fork()`` -- multiprocessing's "fork" start method
  -- inherits the pipe's write end and keeps the server up until it exits too;
  ``subprocess`` children do not, ``close_fds`` is the default.)
* **Free port without races.** The child binds port 0 and prints the port it got, so
  parallel xdist workers (each has its own session fixture, hence its own server) never
  collide, and there is no "find a free port, close it, hope" window.
* **No GIL sharing.** moto parses and copies every body in Python; in-process it would
  compete with the event loop under test (timeouts, throughput, RSS figures all skew).
* Startup costs ~1.5 s once per worker session.

Denied writes (measured with moto 5.2.5, server mode, IAM auth left *off*)
-------------------------------------------------------------------------
moto evaluates a bucket **policy** on every object request, whether or not IAM auth is
enabled: ``S3Response._key_response`` maps the HTTP method to ``s3:<Method>Object``
(``PUT`` -> ``s3:PutObject``, ``POST`` -> ``s3:PostObject``, ...) and answers ``403`` with
an *empty* body when a statement explicitly ``Deny``-s it. So a per-bucket policy gives
denied writes without the process-wide ``INITIAL_NO_AUTH_ACTION_COUNT`` switch (which
would also require real moto IAM users/keys for every request, bucket creation included).
``POST`` matters: a multipart upload starts with ``POST ?uploads``, so the policy denies
``s3:PostObject`` as well (a moto-only action name; real S3 covers it with s3:PutObject).

Faults (HTTP 500, dropped connections)
--------------------------------------
moto cannot be told to fail; :class:`FaultProxy` is a small aiohttp reverse proxy in a
thread of the test process that forwards to moto and can instead answer the next N
(matching) requests with a 5xx S3 error document, or close the connection without a
response.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

#: Fake credentials: moto accepts anything while IAM auth is off (its default).
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"
REGION = "us-east-1"

_CHILD = r"""
import os, sys
from moto.moto_server.threaded_moto_server import ThreadedMotoServer

server = ThreadedMotoServer(sys.argv[1], 0, verbose=False)
server.start()
sys.stdout.write(f"{server.get_host_and_port()[1]}\n")
sys.stdout.flush()
sys.stdin.buffer.read()  # EOF when the parent closes the pipe or dies in any way
try:
    os.unlink(sys.argv[2])  # our log file, in case the parent died without cleaning up
except OSError:
    pass
os._exit(0)  # no need to join werkzeug's request threads
"""

#: Environment variables that would change moto's behaviour (auth, proxying) if inherited.
_CHILD_ENV_DROP = ("INITIAL_NO_AUTH_ACTION_COUNT", "TEST_SERVER_MODE", "MOTO_PORT")


class MotoS3Server:
    """moto's S3 server in a child process bound to ``host`` on a kernel-chosen port."""

    def __init__(self, host: str = "127.0.0.1", startup_timeout: float = 30.0) -> None:
        self.host = host
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def endpoint_url(self) -> str:
        assert self.port is not None, "call start() first"
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> MotoS3Server:
        env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROP}
        # moto's request log goes to a temp file: shown if startup fails, deleted at stop().
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in stop())
            prefix="moto-s3-", suffix=".log", delete=False)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, self.host, self._log.name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
        )
        line = self._read_port_line()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"moto S3 server did not start: {line!r}")
        self.port = int(line)
        return self

    def _read_port_line(self) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        result: list[bytes] = []
        reader = threading.Thread(
            target=lambda: result.append(self._proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(self.startup_timeout)
        if not result:
            with open(self._log.name, "rb") as fh:
                tail = fh.read()[-2000:]
            self.stop()
            raise RuntimeError(f"moto S3 server: no port within {self.startup_timeout}s: {tail!r}")
        return result[0]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()  # the child's cue to exit
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            with contextlib.suppress(OSError):
                os.unlink(self._log.name)
            self._log = None

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- buckets


def s3_client(endpoint_url: str) -> Any:
    """A boto3 S3 client for the test server (explicit credentials: ignores the env)."""
    import boto3  # moto[server] depends on boto3

    return boto3.client(
        "s3", endpoint_url=endpoint_url, region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
    )


def unique_bucket_name(prefix: str = "bk-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def deny_writes(endpoint_url: str, bucket: str,
                actions: tuple[str, ...] = ("s3:PutObject", "s3:PostObject")) -> None:
    """Attach a bucket policy that denies ``actions`` on every key to everyone.

    moto then answers matching object requests ``403`` (empty body); reads, HEAD, LIST and
    DELETE stay allowed, so tests can still inspect the bucket.
    """
    policy = {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "DenyWrites", "Effect": "Deny", "Principal": "*",
            "Action": list(actions), "Resource": f"arn:aws:s3:::{bucket}/*",
        }],
    }
    s3_client(endpoint_url).put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def make_bucket(endpoint_url: str, name: str | None = None, *,
                writes_denied: bool = False) -> str:
    """Create a bucket (unique name unless given); optionally deny writes to it."""
    name = name or unique_bucket_name()
    s3_client(endpoint_url).create_bucket(Bucket=name)
    if writes_denied:
        deny_writes(endpoint_url, name)
    return name


# --------------------------------------------------------------------------- fault proxy

_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "content-length",
})

Match = Callable[[str, str], bool]
"""``match(method, path_qs)``: which requests a fault applies to."""


@dataclass
class _Fault:
    kind: str  # "status" | "drop" | "corrupt" | "delay"
    remaining: int
    status: int = 500
    match: Match | None = None
    seconds: float = 0.0


@dataclass
class ProxyRecord:
    method: str
    path_qs: str
    outcome: str  # "forwarded:<status>", "injected:<status>", "dropped", "bad-digest:<code>",
    #              "upstream-error"; "corrupted+" / "delayed+" prefixes mark those faults


@dataclass
class FaultProxy:
    """Reverse proxy to ``upstream`` that injects 5xx answers or dropped connections.

    Runs an aiohttp server and client on their own event loop in a daemon thread, so it
    works under both sync and async tests. Faults are consumed first-registered first.
    Request bodies are read whole before a fault fires (the client sees a response, not
    a broken pipe), and are buffered when forwarded (parts are a few MB: fine for tests).

    ``verify_checksums=True`` makes the proxy do what real S3 does and moto does not:
    reject a body that does not match its ``x-amz-content-sha256`` (hex, i.e. a signed
    payload), ``x-amz-checksum-sha256`` or ``Content-MD5`` header with ``400``
    (``XAmzContentSHA256Mismatch`` / ``BadDigest``), and echo ``x-amz-checksum-sha256``
    on success (S3 returns it on PutObject/UploadPart; object_store keeps it for
    CompleteMultipartUpload). Combine with :meth:`corrupt_next` to test detection.
    """

    upstream: str
    host: str = "127.0.0.1"
    verify_checksums: bool = False
    records: list[ProxyRecord] = field(default_factory=list)
    port: int | None = None
    _faults: list[_Fault] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: Any = None
    _session: Any = None

    @property
    def endpoint_url(self) -> str:
        assert self.port is not None, "call start() first"
        return f"http://{self.host}:{self.port}"

    # -- control (any thread)

    def fail_next(self, n: int = 1, status: int = 500, match: Match | None = None) -> None:
        """Answer the next ``n`` matching requests with ``status`` and an S3 error body."""
        with self._lock:
            self._faults.append(_Fault("status", n, status, match))

    def drop_next(self, n: int = 1, match: Match | None = None) -> None:
        """Close the connection of the next ``n`` matching requests without answering."""
        with self._lock:
            self._faults.append(_Fault("drop", n, match=match))

    def corrupt_next(self, n: int = 1, match: Match | None = None) -> None:
        """Flip one byte of the next ``n`` matching non-empty request bodies (in flight)."""
        with self._lock:
            self._faults.append(_Fault("corrupt", n, match=match))

    def delay_next(self, n: int = 1, seconds: float = 1.0, match: Match | None = None) -> None:
        """Hold the next ``n`` matching requests ``seconds`` before forwarding them."""
        with self._lock:
            self._faults.append(_Fault("delay", n, match=match, seconds=seconds))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending_faults(self) -> int:
        with self._lock:
            return sum(f.remaining for f in self._faults)

    def _take_fault(self, method: str, path_qs: str, body: bytes) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind == "corrupt" and not body:
                    continue
                if fault.remaining > 0 and (fault.match is None or fault.match(method, path_qs)):
                    fault.remaining -= 1
                    return fault
            return None

    # -- lifecycle

    def start(self) -> FaultProxy:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve_start())
            except BaseException as exc:  # reported to start()
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._serve_stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve_start(self) -> None:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _serve_stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        method, path_qs = request.method, request.path_qs
        body = await request.read()
        fault = self._take_fault(method, path_qs, body)
        tag = ""
        if fault is not None and fault.kind == "drop":
            self.records.append(ProxyRecord(method, path_qs, "dropped"))
            assert request.transport is not None
            request.transport.abort()  # close with no response bytes
            raise asyncio.CancelledError  # aiohttp: handler gone, nothing is written
        if fault is not None and fault.kind == "status":
            self.records.append(ProxyRecord(method, path_qs, f"injected:{fault.status}"))
            return _s3_error(fault.status, "InternalError", "injected by FaultProxy")
        if fault is not None and fault.kind == "delay":
            tag = "delayed+"
            await asyncio.sleep(fault.seconds)
        if fault is not None and fault.kind == "corrupt":
            tag = "corrupted+"
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        echo: dict[str, str] = {}
        if self.verify_checksums and method in ("PUT", "POST"):
            bad = _bad_digest(request.headers, body)
            if bad is not None:
                self.records.append(ProxyRecord(method, path_qs, f"{tag}bad-digest:{bad}"))
                return _s3_error(400, bad, "checksum mismatch (FaultProxy verify_checksums)")
            if "x-amz-checksum-sha256" in request.headers:
                echo["x-amz-checksum-sha256"] = request.headers["x-amz-checksum-sha256"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            async with self._session.request(
                method, self.upstream + path_qs, headers=headers, data=body,
                allow_redirects=False,
            ) as up:
                data = await up.read()
                out_headers = {k: v for k, v in up.headers.items()
                               if k.lower() not in _HOP_BY_HOP}
                if up.status == 200:
                    out_headers.update(echo)
                resp = web.Response(status=up.status, body=data if data else None,
                                    headers=out_headers)
                if method == "HEAD" and "Content-Length" in up.headers:
                    # HEAD: keep the object's size; aiohttp sends no body for HEAD.
                    resp.headers["Content-Length"] = up.headers["Content-Length"]
        except Exception:
            self.records.append(ProxyRecord(method, path_qs, f"{tag}upstream-error"))
            return web.Response(status=502)
        self.records.append(ProxyRecord(method, path_qs, f"{tag}forwarded:{up.status}"))
        return resp


def _s3_error(status: int, code: str, message: str) -> Any:
    from aiohttp import web

    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
           f"<Message>{message}</Message></Error>")
    return web.Response(status=status, body=xml.encode(), content_type="application/xml")


def _bad_digest(headers: Any, body: bytes) -> str | None:
    """The S3 error code real S3 would answer for ``body``, or ``None`` if it matches."""
    declared = headers.get("x-amz-content-sha256", "")
    if len(declared) == 64 and hashlib.sha256(body).hexdigest() != declared.lower():
        return "XAmzContentSHA256Mismatch"
    sha = headers.get("x-amz-checksum-sha256")
    if sha and base64.b64encode(hashlib.sha256(body).digest()).decode() != sha:
        return "BadDigest"
    md5 = headers.get("Content-MD5")
    if md5 and base64.b64encode(hashlib.md5(body).digest()).decode() != md5:
        return "BadDigest"
    return None


# --------------------------------------------------------------------------- IAM auth


def enable_iam_auth(endpoint_url: str, statements: list[dict[str, Any]],
                    user: str = "tester") -> tuple[str, str]:
    """Switch a *dedicated* server to SigV4 + IAM checking; return a user's key pair.

    Creates an IAM user with ``statements`` as its inline policy, then posts
    ``/moto-api/reset-auth 0``: from then on moto verifies every request's signature
    (wrong secret -> 403 ``SignatureDoesNotMatch``) and the user's policy (403
    ``AccessDenied``). Irreversible for that server process and it breaks
    :func:`make_bucket` (which signs with ``testing``), so create buckets *first* and
    never call this on the session ``s3_server``: start a ``MotoS3Server()`` of your own.
    moto cannot check pre-signed URLs in this mode (it answers them ``500``).
    """
    import boto3
    import httpx

    iam = boto3.client(
        "iam", endpoint_url=endpoint_url, region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
    )
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": statements}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    httpx.post(f"{endpoint_url}/moto-api/reset-auth", content=b"0").raise_for_status()
    return key["AccessKeyId"], key["SecretAccessKey"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    """moto's S3 server, one per test session (per xdist worker)."""
    server = MotoS3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: MotoS3Server) -> tuple[str, str]:
    """``(endpoint_url, bucket_name)`` of a fresh bucket with a unique name."""
    return s3_server.endpoint_url, make_bucket(s3_server.endpoint_url)


@pytest.fixture
def s3_env(s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fake credentials + region + endpoint in ``os.environ`` for this test only."""
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
    }
    for key in ("AWS_SESSION_TOKEN", "AWS_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT",
                "AWS_ENDPOINT_URL_S3", "AWS_CHECKSUM_ALGORITHM", "AWS_ALLOW_HTTP"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_fault_proxy(s3_server: MotoS3Server) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the session's moto server."""
    proxy = FaultProxy(s3_server.endpoint_url).start()
    try:
        yield proxy
    finally:
        proxy.stop()
