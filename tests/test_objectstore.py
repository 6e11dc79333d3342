"""The object store client against a real S3 protocol server (moto on loopback).

Uploads are streamed and confirmed (ETag = our MD5 or multipart ETag, then a HEAD), corruption
on the way is caught, a crash's leftover is recognised by HEAD instead of uploaded again, and
every failure reaches the caller as a batchkling error of the right kind, never an obstore one.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from s3server import FaultProxy, MotoS3Server, make_bucket, s3_client

from batchkling.errors import (
    ConfigError,
    ObjectCorrupted,
    ObjectMissing,
    ObjectStoreDenied,
    ObjectStoreError,
    ObjectStoreUnavailable,
)
from batchkling.models import StoreURL
from batchkling.outputs.objectstore import (
    CHUNK_SIZE,
    MIB,
    ObjectStore,
    check_endpoint,
    chunk_size_for,
    find_credentials,
)

KEYS = {"AWS_ACCESS_KEY_ID": "AKIATESTOBJECTSTORE1", "AWS_SECRET_ACCESS_KEY": "objstore/Secret+1"}


def _env(endpoint: str, **extra: str) -> dict[str, str]:
    return {**KEYS, "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", **extra}


def _store(endpoint: str, bucket: str, prefix: str = "runs/", **options: object) -> ObjectStore:
    return ObjectStore(f"s3://{bucket}/{prefix}", env=_env(endpoint), **options)  # type: ignore[arg-type]


def _fast(endpoint: str, bucket: str) -> ObjectStore:
    """A store whose own retries give up quickly (obstore retries 5xx inside each call)."""
    return _store(endpoint, bucket, max_retries=1, retry_timeout=3.0)


class TestLocations:
    def test_store_urls_are_checked_and_normalised(self) -> None:
        """s3://bucket/prefix gets one trailing slash; bad buckets, schemes and '..' are refused."""
        assert StoreURL.parse("s3://team-videos/spring/ads") == StoreURL("team-videos",
                                                                         "spring/ads/")
        assert StoreURL.parse("s3://team-videos").uri("a.mp4") == "s3://team-videos/a.mp4"
        for bad in ("https://b/x", "s3://", "s3://Bad_Bucket/", "s3://b/", "s3://bk/../x",
                    "s3://key:secret@bucket/", "s3://bucket/x?y=1"):
            with pytest.raises(ValueError):
                StoreURL.parse(bad)

    def test_plain_http_endpoints_only_on_loopback_or_when_allowed(self) -> None:
        """http on 127.0.0.1/localhost is fine; elsewhere it needs allow_http."""
        assert check_endpoint("http://127.0.0.1:9000/", allow_http=False, source="x") == \
            "http://127.0.0.1:9000"
        assert check_endpoint("http://localhost:9000", allow_http=False, source="x")
        with pytest.raises(ConfigError, match="plain-http"):
            check_endpoint("http://10.1.2.3:9000", allow_http=False, source="AWS_ENDPOINT_URL")
        assert check_endpoint("http://10.1.2.3:9000", allow_http=True, source="x")
        with pytest.raises(ConfigError, match="http"):
            check_endpoint("ftp://minio:21", allow_http=True, source="x")

    def test_big_files_get_bigger_parts(self) -> None:
        """Parts are 8 MiB until 10,000 of them would not hold the file."""
        assert chunk_size_for(100 * MIB) == CHUNK_SIZE
        assert chunk_size_for(200_000 * MIB) == 20 * MIB


class TestCredentials:
    def test_environment_keys_win(self, tmp_path: Path) -> None:
        """AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (+ session token) are used as they are."""
        creds = find_credentials({**KEYS, "AWS_SESSION_TOKEN": "tok", "HOME": str(tmp_path)})
        assert (creds.access_key_id, creds.session_token, creds.source) == (
            KEYS["AWS_ACCESS_KEY_ID"], "tok", "environment")

    def test_a_profile_is_read_from_the_shared_credentials_file(self, tmp_path: Path) -> None:
        """AWS_PROFILE names a section of ~/.aws/credentials; its region comes from config."""
        aws = tmp_path / ".aws"
        aws.mkdir()
        (aws / "credentials").write_text("[team]\naws_access_key_id = AKIAPROFILE\n"
                                         "aws_secret_access_key = prof/secret\n")
        (aws / "config").write_text("[profile team]\nregion = eu-west-3\n")
        creds = find_credentials({"HOME": str(tmp_path), "AWS_PROFILE": "team"})
        assert (creds.access_key_id, creds.secret_access_key, creds.region) == (
            "AKIAPROFILE", "prof/secret", "eu-west-3")

    def test_no_credentials_is_a_clear_config_error(self, tmp_path: Path) -> None:
        """Nothing in the environment and no profile: the message says what to export."""
        with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
            find_credentials({"HOME": str(tmp_path)})
        with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY is not set"):
            find_credentials({"HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": "AKIA1234"})

    def test_a_profile_without_keys_says_what_is_not_supported(self, tmp_path: Path) -> None:
        """An SSO profile has no static keys: the error names the export command."""
        (tmp_path / ".aws").mkdir()
        (tmp_path / ".aws" / "config").write_text("[default]\nsso_session = corp\n")
        with pytest.raises(ConfigError, match="export-credentials"):
            find_credentials({"HOME": str(tmp_path)})


class TestUploads:
    async def test_small_file_is_one_put_confirmed_by_md5_and_head(
            self, s3_bucket: tuple[str, str], tmp_path: Path) -> None:
        """A small file goes in one request; its ETag is its MD5 and the object is what we sent."""
        endpoint, bucket = s3_bucket
        path = tmp_path / "clip.mp4"
        data = os.urandom(50_000)
        path.write_bytes(data)
        stored = await _store(endpoint, bucket).upload_file("r1/clip.mp4", path,
                                                            content_type="video/mp4")
        assert stored.uri == f"s3://{bucket}/runs/r1/clip.mp4"
        assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert stored.etag == hashlib.md5(data).hexdigest() and stored.etag_verified
        got = s3_client(endpoint).get_object(Bucket=bucket, Key="runs/r1/clip.mp4")
        assert got["Body"].read() == data and got["ContentType"] == "video/mp4"

    async def test_large_file_streams_as_multipart_with_its_multipart_etag(
            self, s3_bucket: tuple[str, str], tmp_path: Path) -> None:
        """Over one part, the upload is multipart and its ETag is md5(part md5s)-N."""
        endpoint, bucket = s3_bucket
        path = tmp_path / "big.mp4"
        data = os.urandom(CHUNK_SIZE * 2 + 12345)
        path.write_bytes(data)
        stored = await _store(endpoint, bucket).upload_file("big.mp4", path,
                                                            expect_sha256=hashlib.sha256(
                                                                data).hexdigest())
        assert stored.etag.endswith("-3") and stored.etag_verified
        body = s3_client(endpoint).get_object(Bucket=bucket, Key="runs/big.mp4")["Body"].read()
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()

    async def test_corruption_on_the_way_is_caught(self, s3_fault_proxy: FaultProxy,
                                                   s3_server: MotoS3Server,
                                                   tmp_path: Path) -> None:
        """A flipped byte the server stores anyway fails our ETag check: ObjectCorrupted."""
        bucket = make_bucket(s3_server.endpoint_url)
        path = tmp_path / "clip.mp4"
        path.write_bytes(os.urandom(2000))
        s3_fault_proxy.corrupt_next(1, match=lambda m, p: m == "PUT")
        with pytest.raises(ObjectCorrupted, match="not the MD5"):
            await _store(s3_fault_proxy.endpoint_url, bucket).upload_file("c.mp4", path)

    async def test_a_file_changed_since_verification_is_refused(
            self, s3_bucket: tuple[str, str], tmp_path: Path) -> None:
        """expect_sha256 that no longer matches the file: nothing stored, ObjectCorrupted."""
        endpoint, bucket = s3_bucket
        path = tmp_path / "clip.mp4"
        path.write_bytes(b"\0" * 100)
        with pytest.raises(ObjectCorrupted, match="changed since"):
            await _store(endpoint, bucket).upload_file("x.mp4", path, expect_sha256="0" * 64)
        assert await _store(endpoint, bucket).head("x.mp4") is None

    async def test_find_copy_recognises_the_same_bytes_only(
            self, s3_bucket: tuple[str, str], tmp_path: Path) -> None:
        """HEAD + local hashes say whether the object already holds this file."""
        endpoint, bucket = s3_bucket
        store = _store(endpoint, bucket)
        path = tmp_path / "clip.mp4"
        path.write_bytes(os.urandom(3000))
        assert await store.find_copy("k.mp4", path) is None
        stored = await store.upload_file("k.mp4", path)
        found = await store.find_copy("k.mp4", path)
        assert found is not None and (found.etag, found.sha256) == (stored.etag, stored.sha256)
        other = tmp_path / "other.mp4"
        other.write_bytes(os.urandom(3000))
        assert await store.find_copy("k.mp4", other) is None

    async def test_presigned_links_serve_the_object(
            self, s3_bucket: tuple[str, str], tmp_path: Path) -> None:
        """A pre-signed GET returns the bytes; the plain URL is refused."""
        endpoint, bucket = s3_bucket
        store = _store(endpoint, bucket)
        await store.put_bytes("img.png", b"png-bytes", content_type="image/png")
        (url,) = await store.presign(["img.png"], timedelta(minutes=5))
        assert "X-Amz-Signature=" in url and "X-Amz-Expires=300" in url
        async with httpx.AsyncClient() as http:
            assert (await http.get(url)).content == b"png-bytes"
            assert (await http.get(url.split("?")[0])).status_code == 403


class TestErrors:
    async def test_missing_bucket(self, s3_server: MotoS3Server) -> None:
        """A bucket that does not exist: ObjectMissing naming NoSuchBucket."""
        with pytest.raises(ObjectMissing, match="bucket does not exist"):
            await _store(s3_server.endpoint_url, "no-such-bucket-here").probe()

    async def test_write_denied(self, s3_server: MotoS3Server, tmp_path: Path) -> None:
        """A bucket policy that denies writes: ObjectStoreDenied, small and multipart alike."""
        bucket = make_bucket(s3_server.endpoint_url, writes_denied=True)
        with pytest.raises(ObjectStoreDenied, match="access denied"):
            await _store(s3_server.endpoint_url, bucket).probe()
        big = tmp_path / "big.mp4"
        big.write_bytes(b"\0" * (CHUNK_SIZE + 1))
        with pytest.raises(ObjectStoreDenied):
            await _store(s3_server.endpoint_url, bucket).upload_file("big.mp4", big)

    async def test_server_errors_after_retries_are_unavailable(
            self, s3_fault_proxy: FaultProxy, s3_server: MotoS3Server) -> None:
        """5xx answers that outlast the client's retries: ObjectStoreUnavailable (retryable)."""
        bucket = make_bucket(s3_server.endpoint_url)
        s3_fault_proxy.fail_next(10)
        with pytest.raises(ObjectStoreUnavailable, match="HTTP 500") as info:
            await _fast(s3_fault_proxy.endpoint_url, bucket).probe()
        assert info.value.retryable

    async def test_a_few_server_errors_are_absorbed(
            self, s3_fault_proxy: FaultProxy, s3_server: MotoS3Server) -> None:
        """One 500 then success: the client's own retry hides it."""
        bucket = make_bucket(s3_server.endpoint_url)
        s3_fault_proxy.fail_next(1)
        await _fast(s3_fault_proxy.endpoint_url, bucket).probe()
        assert s3_fault_proxy.records[0].outcome == "injected:500"

    async def test_unreachable_endpoint(self) -> None:
        """Nothing listening: ObjectStoreUnavailable, not an obstore exception."""
        store = ObjectStore("s3://some-bucket/", env=_env("http://127.0.0.1:9"), max_retries=0)
        with pytest.raises(ObjectStoreUnavailable, match="could not be reached"):
            await store.probe()

    async def test_no_obstore_exception_escapes(self, s3_bucket: tuple[str, str]) -> None:
        """Whatever fails, callers see ObjectStoreError subclasses."""
        endpoint, bucket = s3_bucket
        store = _store(endpoint, bucket)
        assert await store.head("nothing-here") is None
        await store.delete("nothing-here")  # already gone: fine
        with pytest.raises(ObjectStoreError):
            await store.upload_file("x", Path("/nonexistent/file.mp4"))
