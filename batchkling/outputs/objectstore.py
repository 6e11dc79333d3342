"""Object storage for a run's outputs: an S3-compatible bucket (AWS S3, R2, MinIO, GCS's S3 API).

``output.store: s3://bucket/prefix/`` sends each verified video to
``<prefix>/<run_id>/<job_id>.mp4`` (and, with ``inputs.upload``, local images to
``<prefix>/inputs/<sha256>.<ext>``) through obstore, an async client over Rust's
``object_store``.

What a confirmed upload means here. Files up to :data:`CHUNK_SIZE` go as one ``PutObject``;
larger ones stream through an async generator that reads 1 MiB at a time in a worker thread,
so memory holds about ``CHUNK_SIZE × MAX_CONCURRENCY`` however big the video is (obstore then
uses a multipart upload with parts of exactly ``chunk_size`` bytes). Every request carries the
SHA-256 of its body (SigV4's signed payload), which S3 checks. We also hash what we stream:
the store's ETag must equal our MD5 (one part) or ``md5(part md5s)-N`` (multipart), and a HEAD
must show the object with our size and that ETag. A store whose ETags are not MD5s (SSE-KMS,
some S3-compatible services) is confirmed by size and ETag echo only (``etag_verified=None``).

Credentials come from the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``; web identity and container credentials by
their variables) or a profile in ``~/.aws/credentials`` (``AWS_PROFILE``), never from the
manifest. Plain-http endpoints are refused unless they are on loopback or ``allow_http`` says
so. Every obstore exception is translated into an :class:`~batchkling.errors.ObjectStoreError`
here; none escapes.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import hashlib
import ipaddress
import mimetypes
import os
import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batchkling.errors import (
    ConfigError,
    ObjectCorrupted,
    ObjectMissing,
    ObjectStoreDenied,
    ObjectStoreError,
    ObjectStoreUnavailable,
)
from batchkling.models import StoreURL

MIB = 1024 * 1024
#: Parts of a multipart upload (all but the last); S3's minimum is 5 MiB.
CHUNK_SIZE = 8 * MIB
#: Parts in flight at once: with 8 MiB parts about 40 MiB of buffers (docs/benchmarks.md).
MAX_CONCURRENCY = 4
#: S3 allows at most this many parts, so a huge file gets bigger parts.
MAX_PARTS = 10_000
_READ_BLOCK = 1 * MIB
#: SigV4 pre-signed URLs live at most 7 days.
MAX_LINK_SECONDS = 7 * 86400
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-\d+)?$")
_STATUS = re.compile(r"status(?: code)?:? (\d{3})")
_S3_CODE = re.compile(r"<Code>([A-Za-z0-9]+)</Code>")
#: Variables that let obstore find credentials on its own (web identity, ECS/EKS containers).
_ENV_CHAINS = ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
               "AWS_CONTAINER_CREDENTIALS_FULL_URI")


# ---- where ---------------------------------------------------------------------------------


def video_key(run_id: str, job_id: str) -> str:
    """Where a job's video goes, under the store's prefix."""
    return f"{run_id}/{job_id}.mp4"


def input_key(sha256: str, suffix: str) -> str:
    """Where a local input image goes, under the store's prefix: by content, once."""
    ext = suffix.lower().lstrip(".")
    return f"inputs/{sha256}.{'jpg' if ext == 'jpeg' else ext or 'bin'}"


def key_of(uri: str, where: StoreURL) -> str | None:
    """The key under ``where``'s prefix of an ``s3://`` URI, or None if it is elsewhere."""
    head = where.uri()
    return uri[len(head):] if uri.startswith(head) else None


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object the store confirmed: its key (under the prefix), URI, size, sha256 and ETag.

    ``etag_verified`` is True when the ETag matched the MD5 we computed, None when the store's
    ETags are not MD5s (then size and the echoed ETag are all we can check).
    """

    key: str
    uri: str
    size: int
    sha256: str
    etag: str
    etag_verified: bool | None


@dataclass(frozen=True, slots=True)
class Credentials:
    """Keys found in the environment or a profile (None: obstore reads a token chain itself)."""

    access_key_id: str | None
    secret_access_key: str | None
    session_token: str | None
    region: str | None
    source: str


# ---- settings ------------------------------------------------------------------------------


def find_credentials(env: Mapping[str, str]) -> Credentials:
    """AWS credentials from the environment, else from a profile; ConfigError if there are none.

    Order: ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``); web
    identity or container credentials named by their variables; the profile ``AWS_PROFILE``
    (default ``default``) in ``AWS_SHARED_CREDENTIALS_FILE`` or ``AWS_CONFIG_FILE``. Instance
    metadata (IMDS) is not tried: it would make a missing key look like a slow network.
    """
    key, secret = env.get("AWS_ACCESS_KEY_ID", "").strip(), env.get(
        "AWS_SECRET_ACCESS_KEY", "").strip()
    if key and secret:
        return Credentials(key, secret, env.get("AWS_SESSION_TOKEN") or None, None,
                           "environment")
    if key or secret:
        missing = "AWS_SECRET_ACCESS_KEY" if key else "AWS_ACCESS_KEY_ID"
        raise ConfigError(f"output.store: {missing} is not set (the other half of the key is)")
    if any(env.get(name) for name in _ENV_CHAINS):
        return Credentials(None, None, None, None, "environment (web identity or container)")
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    home = Path(env.get("HOME") or Path.home())
    files = [
        (Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials"), profile),
        (Path(env.get("AWS_CONFIG_FILE") or home / ".aws" / "config"),
         profile if profile == "default" else f"profile {profile}"),
    ]
    found: dict[str, str] = {}
    for path, section in files:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.has_section(section):
            for name, value in parser.items(section):
                found.setdefault(name, value.strip())
    if found.get("aws_access_key_id") and found.get("aws_secret_access_key"):
        return Credentials(found["aws_access_key_id"], found["aws_secret_access_key"],
                           found.get("aws_session_token") or None, found.get("region"),
                           f"profile {profile!r}")
    if found:
        raise ConfigError(
            f"output.store: the AWS profile {profile!r} has no aws_access_key_id and "
            "aws_secret_access_key (SSO and credential_process profiles are not read: export "
            "the keys, e.g. `eval \"$(aws configure export-credentials --format env)\"`)")
    raise ConfigError(
        "output.store: no AWS credentials: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(and AWS_SESSION_TOKEN for temporary keys), or name a profile of ~/.aws/credentials "
        "with AWS_PROFILE; credentials are never read from the manifest")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint(endpoint: str, *, allow_http: bool, source: str) -> str:
    """An endpoint URL without its trailing slash; http only on loopback or when allowed."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{source}: the S3 endpoint must be an http(s) URL; found {endpoint!r}")
    if parts.username or parts.password:
        raise ConfigError(f"{source}: the S3 endpoint must not carry credentials")
    if parts.scheme == "http" and not allow_http and not _is_loopback(parts.hostname):
        raise ConfigError(
            f"{source}: refusing the plain-http S3 endpoint {parts.scheme}://{parts.netloc}: "
            "signed requests and videos would cross the network unencrypted; use https, or set "
            "output.allow_http: true for a trusted network")
    return endpoint.strip().rstrip("/")


# ---- errors --------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    # obstore messages end in a long "Debug source:" dump; the first line says what happened.
    text = str(exc).strip().split("\n", 1)[0].strip()
    return text[:300] or type(exc).__name__


def translate(exc: BaseException, what: str) -> ObjectStoreError:
    """The batchkling error for what obstore raised while doing ``what``."""
    from obstore.exceptions import (
        AlreadyExistsError,
        PermissionDeniedError,
        PreconditionError,
        UnauthenticatedError,
    )

    text = str(exc)
    status_match = _STATUS.search(text)
    status = int(status_match.group(1)) if status_match else None
    code_match = _S3_CODE.search(text)
    code = code_match.group(1) if code_match else None
    detail = f"{what}: {code or _first_line(exc)}"
    if isinstance(exc, FileNotFoundError):
        if code == "NoSuchBucket":
            return ObjectMissing(f"{what}: the bucket does not exist (NoSuchBucket)")
        return ObjectMissing(f"{what}: not found")
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or status in (401, 403):
        return ObjectStoreDenied(f"{what}: access denied ({code or status or 403}): the "
                                 "credentials may not do this here")
    if isinstance(exc, AlreadyExistsError | PreconditionError):
        return ObjectStoreError(f"{detail} (precondition failed)")
    if "169.254.169.254" in text:
        return ObjectStoreDenied(f"{what}: no credentials found")
    if status is not None and (status >= 500 or status == 429):
        return ObjectStoreUnavailable(f"{what}: the store answered HTTP {status}"
                                      f"{f' ({code})' if code else ''}")
    if status is not None and 400 <= status < 500:
        error = ObjectStoreError(f"{what}: the store refused the request (HTTP {status}"
                                 f"{f', {code}' if code else ''})")
        if code in ("RequestTimeout", "SlowDown"):
            return ObjectStoreUnavailable(str(error))
        return error
    lowered = text.lower()
    if any(word in lowered for word in ("error sending request", "timed out", "timeout",
                                        "connection", "connect", "broken pipe", "reset")):
        return ObjectStoreUnavailable(f"{what}: the store could not be reached "
                                      f"({_first_line(exc)})")
    return ObjectStoreError(detail)


# ---- hashing -------------------------------------------------------------------------------


def _new_md5(data: bytes = b"") -> Any:
    # S3's ETag algorithm, an integrity check here, not a security one (FIPS builds allow it).
    return hashlib.md5(data, usedforsecurity=False)


@dataclass
class _Hasher:
    """SHA-256 of the whole stream and an MD5 per ``chunk_size`` part (obstore's part bounds)."""

    chunk_size: int
    sha256: Any = field(default_factory=hashlib.sha256)
    part_md5s: list[bytes] = field(default_factory=list)
    _md5: Any = field(default_factory=lambda: _new_md5())
    _fill: int = 0
    size: int = 0

    def update(self, block: bytes) -> None:
        self.sha256.update(block)
        self.size += len(block)
        view = memoryview(block)
        while view:
            take = min(len(view), self.chunk_size - self._fill)
            self._md5.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == self.chunk_size:
                self.part_md5s.append(self._md5.digest())
                self._md5, self._fill = _new_md5(), 0

    def etag(self, *, multipart: bool) -> str:
        """The ETag S3 gives these bytes: MD5 for one part, ``md5(part md5s)-N`` for N parts."""
        parts = list(self.part_md5s)
        if self._fill or not parts:
            parts.append(self._md5.digest())
        if not multipart:
            return parts[0].hex()
        return f"{_new_md5(b''.join(parts)).hexdigest()}-{len(parts)}"


def chunk_size_for(size: int) -> int:
    """The part size for a file of ``size`` bytes: 8 MiB, more when 10,000 parts would not do."""
    need = -(-size // MAX_PARTS)
    return max(CHUNK_SIZE, -(-need // MIB) * MIB)


def hash_file(path: Path, chunk: int) -> _Hasher:
    """Hash a file as an upload of it would (blocking: call in a worker thread)."""
    hasher = _Hasher(chunk)
    with path.open("rb") as fh:
        while block := fh.read(_READ_BLOCK):
            hasher.update(block)
    return hasher


async def _blocks(path: Path, hasher: _Hasher) -> AsyncIterator[bytes]:
    """``path`` in 1 MiB blocks read off the event loop, hashed as they are read."""
    fh = await asyncio.to_thread(path.open, "rb")
    try:

        def read() -> bytes:
            data = fh.read(_READ_BLOCK)
            hasher.update(data)
            return data

        while data := await asyncio.to_thread(read):
            yield data
    finally:
        fh.close()


def _unquote(etag: str | None) -> str:
    return (etag or "").strip().strip('"')


# ---- the store -----------------------------------------------------------------------------


class ObjectStore:
    """One ``s3://bucket/prefix/`` with the credentials of the environment. Keys are relative
    to the prefix; every method raises :class:`ObjectStoreError`, never an obstore error."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        allow_http: bool = False,
        env: Mapping[str, str] | None = None,
        max_retries: int = 3,
        retry_timeout: float = 60.0,
        connect_timeout: float = 5.0,
        request_timeout: float = 120.0,
    ) -> None:
        from obstore.store import S3Store

        env = os.environ if env is None else env
        try:
            self.where = StoreURL.parse(url)
        except ValueError as exc:
            raise ConfigError(f"output.store: {exc}") from None
        creds = find_credentials(env)
        self.credentials_source = creds.source
        self._secrets = tuple(s for s in (creds.access_key_id, creds.secret_access_key,
                                          creds.session_token) if s)
        endpoint, source = endpoint_url, "output.endpoint_url"
        if not endpoint:
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
                if env.get(name):
                    endpoint, source = env[name], name
                    break
        config: dict[str, Any] = {
            "region": region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
            or creds.region or "us-east-1",
            "skip_signature": False,
        }
        http = False
        if endpoint:
            config["endpoint"] = check_endpoint(endpoint, allow_http=allow_http, source=source)
            http = config["endpoint"].startswith("http://")
        if creds.access_key_id:
            config["access_key_id"] = creds.access_key_id
            config["secret_access_key"] = creds.secret_access_key
            if creds.session_token:
                config["session_token"] = creds.session_token
        try:
            self._store = S3Store(
                self.where.bucket,
                prefix=self.where.prefix.rstrip("/") or None,
                config=config,  # type: ignore[arg-type]  # a dict of S3Config keys
                client_options={
                    # Set every time: it overrides an AWS_ALLOW_HTTP in the environment.
                    "allow_http": http,
                    "connect_timeout": timedelta(seconds=connect_timeout),
                    # The whole request, body included: 8 MiB (one part, or a small video's
                    # single PUT) in two minutes needs about 0.6 Mbit/s.
                    "timeout": timedelta(seconds=request_timeout),
                },
                retry_config={
                    "max_retries": max_retries,
                    "retry_timeout": timedelta(seconds=retry_timeout),
                    "backoff": {"init_backoff": timedelta(milliseconds=100),
                                "max_backoff": timedelta(seconds=5), "base": 2},
                },
            )
        except Exception as exc:  # obstore's own config errors (ValueError, BaseError)
            raise ConfigError(f"output.store {self.where}: {_first_line(exc)}") from None

    @classmethod
    def from_output(cls, output: Mapping[str, Any], env: Mapping[str, str] | None = None,
                    **options: Any) -> ObjectStore | None:
        """The store an ``output`` manifest section (as a dict) names, or None without one."""
        url = output.get("store")
        if not url:
            return None
        return cls(str(url), endpoint_url=output.get("endpoint_url"),
                   region=output.get("region"), allow_http=bool(output.get("allow_http")),
                   env=env, **options)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The credential values in use, for the log redactor (never to be written anywhere)."""
        return self._secrets

    def uri(self, key: str) -> str:
        """``s3://bucket/prefix/key``."""
        return self.where.uri(key)

    # -- requests

    async def head(self, key: str) -> tuple[int, str] | None:
        """``(size, etag)`` of the object at ``key``, or None when there is none."""
        import obstore

        try:
            meta = await obstore.head_async(self._store, key)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise translate(exc, f"HEAD {self.uri(key)}") from None
        return int(meta["size"]), _unquote(meta["e_tag"])

    async def delete(self, key: str) -> None:
        """Delete the object at ``key`` (no error if it is already gone)."""
        import obstore

        try:
            await obstore.delete_async(self._store, key)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise translate(exc, f"DELETE {self.uri(key)}") from None

    async def put_bytes(self, key: str, data: bytes, *,
                        content_type: str | None = None) -> StoredObject:
        """Store small ``data`` in one request, then confirm it (ETag and HEAD)."""
        hasher = _Hasher(max(CHUNK_SIZE, len(data) + 1))
        hasher.update(data)
        return await self._put(key, data, hasher, multipart=False, content_type=content_type)

    async def upload_file(self, key: str, path: Path, *, content_type: str | None = None,
                          expect_sha256: str | None = None) -> StoredObject:
        """Stream ``path`` to ``key`` with bounded memory and confirm what the store holds.

        ``expect_sha256``: the file's sha256 as recorded when it was verified; a file that
        changed since is refused (:class:`ObjectCorrupted`) instead of being stored as it.
        """
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
        except OSError as exc:
            raise ObjectStoreError(f"cannot read {path}: {exc.strerror or exc}") from None
        chunk = chunk_size_for(size)
        hasher = _Hasher(chunk)
        multipart = size > chunk
        body: Any
        if multipart:
            body = _blocks(path, hasher)
        else:
            try:
                body = await asyncio.to_thread(path.read_bytes)
            except OSError as exc:
                raise ObjectStoreError(f"cannot read {path}: {exc.strerror or exc}") from None
            hasher.update(body)
        if expect_sha256 is not None and not multipart and hasher.sha256.hexdigest() != \
                expect_sha256:
            raise ObjectCorrupted(f"{path} changed since it was verified (sha256 differs)")
        stored = await self._put(key, body, hasher, multipart=multipart, chunk=chunk,
                                 content_type=content_type)
        if expect_sha256 is not None and stored.sha256 != expect_sha256:
            raise ObjectCorrupted(f"{path} changed since it was verified (sha256 differs); "
                                  f"{self.uri(key)} holds the changed bytes")
        return stored

    async def _put(self, key: str, body: Any, hasher: _Hasher, *, multipart: bool,
                   chunk: int = CHUNK_SIZE, content_type: str | None) -> StoredObject:
        import obstore

        attributes: Any = {"Content-Type": content_type} if content_type else None
        uri = self.uri(key)
        try:
            if multipart:
                result = await obstore.put_async(self._store, key, body, attributes=attributes,
                                                 chunk_size=chunk,
                                                 max_concurrency=MAX_CONCURRENCY)
            else:
                result = await obstore.put_async(self._store, key, body, attributes=attributes,
                                                 use_multipart=False)
        except Exception as exc:
            raise translate(exc, f"PUT {uri}") from None
        etag = _unquote(result.get("e_tag"))
        expected = hasher.etag(multipart=multipart)
        verified: bool | None = None
        if _MD5_ETAG.match(etag):
            if etag != expected:
                raise ObjectCorrupted(f"PUT {uri}: the store's ETag {etag} is not the MD5 of "
                                      f"the bytes sent ({expected}): corrupted on the way")
            verified = True
        seen = await self.head(key)
        if seen is None:
            raise ObjectMissing(f"PUT {uri} was answered, but a HEAD finds no object there")
        if seen != (hasher.size, etag):
            raise ObjectCorrupted(f"PUT {uri}: the store holds {seen[0]:,} bytes with ETag "
                                  f"{seen[1]}, not the {hasher.size:,} bytes sent ({etag})")
        return StoredObject(key, uri, hasher.size, hasher.sha256.hexdigest(), etag, verified)

    async def holds(self, key: str, data: bytes) -> bool:
        """Whether the object at ``key`` is ``data``: same size, and same MD5 where the
        store's ETag is one."""
        seen = await self.head(key)
        if seen is None or seen[0] != len(data):
            return False
        return not _MD5_ETAG.match(seen[1]) or seen[1] == _new_md5(data).hexdigest()

    async def find_copy(self, key: str, path: Path) -> StoredObject | None:
        """The object at ``key`` if it holds exactly ``path``'s bytes (size and MD5 ETag).

        What repairs a crash between an upload and its commit: the object is checked, not
        uploaded again blindly. None when it is missing, differs, or its ETag is not an MD5
        (then nothing can be proven and the caller uploads again).
        """
        seen = await self.head(key)
        if seen is None:
            return None
        size, etag = seen
        try:
            local = (await asyncio.to_thread(path.stat)).st_size
        except OSError:
            return None
        if size != local or not _MD5_ETAG.match(etag):
            return None
        chunk = chunk_size_for(size)
        try:
            hasher = await asyncio.to_thread(hash_file, path, chunk)
        except OSError:
            return None
        if hasher.etag(multipart=etag.count("-") == 1) != etag:
            return None
        return StoredObject(key, self.uri(key), size, hasher.sha256.hexdigest(), etag, True)

    async def presign(self, keys: Sequence[str], expires: timedelta) -> list[str]:
        """Pre-signed GET URLs for ``keys`` (signed locally: no request, so no existence check).

        Anyone holding one can read that object until it expires (at most 7 days).
        """
        import obstore

        if not keys:
            return []
        expires = min(expires, timedelta(seconds=MAX_LINK_SECONDS))
        try:
            urls = await obstore.sign_async(self._store, "GET", list(keys), expires)
        except Exception as exc:
            raise translate(exc, f"signing links under {self.where}") from None
        return [str(u) for u in urls]

    async def probe(self) -> None:
        """Write, read back and delete a tiny marker under the prefix: proves the bucket exists
        and takes writes with these credentials before anything is paid for."""
        key = f".batchkling-probe-{uuid.uuid4().hex}"
        await self.put_bytes(key, b"batchkling write probe\n", content_type="text/plain")
        # A store that allows writes but not deletes keeps a 23-byte marker: harmless.
        with contextlib.suppress(ObjectStoreError):
            await self.delete(key)


def content_type(path: Path) -> str:
    """The MIME type to store ``path`` under (players and browsers look at it)."""
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


__all__ = [
    "CHUNK_SIZE",
    "MAX_CONCURRENCY",
    "ObjectStore",
    "StoreURL",
    "StoredObject",
    "content_type",
    "find_credentials",
    "input_key",
    "key_of",
    "translate",
    "video_key",
]
