"""A run's object store (``output.store``): opened and probed before anything is paid for,
verified videos out to it, local input images in through it.

The engine changes job states; this module does the store's work for it:

- :func:`open_output_store` builds the store from the run's settings and the AWS environment and
  writes, reads back and deletes a marker under the prefix, so a missing bucket, refused
  credentials or a bad URL end the invocation with exit 2 before the first create.
- :class:`VideoUploads` puts a verified video at ``<prefix>/<run_id>/<job_id>.mp4``, retrying
  an unavailable store with backoff, and after a crash finds out whether the object already
  holds the file (HEAD: size and ETag) instead of uploading it again blindly.
- :class:`InputImages` maps a job's local ``image``/``image_tail`` to pre-signed URLs of
  ``<prefix>/inputs/<sha256>.<ext>`` (each file uploaded once), so the provider gets the URL
  form API.md calls safe; providers never learn that a store exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from batchkling.clock import Clock
from batchkling.errors import (
    ConfigError,
    ObjectMissing,
    ObjectStoreDenied,
    ObjectStoreError,
    ObjectStoreUnavailable,
    TaskFailed,
)
from batchkling.logs import redactor
from batchkling.models import JobSpec, JobState
from batchkling.outputs.objectstore import (
    ObjectStore,
    StoredObject,
    content_type,
    input_key,
    video_key,
)
from batchkling.run.download import Downloaded
from batchkling.store import JobRow

if TYPE_CHECKING:
    from batchkling.manifest.document import RunConfig

#: Tries of one upload at our level; obstore retries each request 3 times inside each try.
UPLOAD_TRIES = 4
#: Input image links live twice the task deadline, within these bounds: long enough for a
#: provider that fetches the image only when the queued task starts.
_INPUT_LINK_MIN = 6 * 3600.0
_INPUT_LINK_MAX = 7 * 86400.0


async def open_output_store(config: RunConfig, env: Mapping[str, str]) -> ObjectStore | None:
    """The run's object store, probed; None without ``output.store``. ConfigError (exit 2)
    for a bad URL, missing credentials, a refused or missing bucket, an unreachable store."""
    output = config.output
    if output.store is None:
        if config.inputs.upload:
            raise ConfigError("inputs.upload needs output.store (s3://bucket/prefix/) to put the "
                              "images in")
        return None
    if not output.download:
        raise ConfigError("output.store needs output.download: true (each video is downloaded "
                          "and verified, then uploaded)")
    store = ObjectStore.from_output(output.model_dump(), env)
    assert store is not None
    for secret in store.secrets:
        redactor.register(secret)
    try:
        await store.probe()
    except ObjectStoreError as exc:
        raise ConfigError(f"output.store {store.where} cannot be used: {exc}; {_hint(exc, store)}."
                          " Nothing was submitted") from None
    return store


def _hint(exc: ObjectStoreError, store: ObjectStore) -> str:
    if isinstance(exc, ObjectMissing):
        return "create the bucket, or fix the bucket name in output.store"
    if isinstance(exc, ObjectStoreDenied):
        return (f"the credentials (from {store.credentials_source}) need s3:PutObject and "
                f"s3:GetObject on {store.where}*")
    if isinstance(exc, ObjectStoreUnavailable):
        return "check output.endpoint_url (or AWS_ENDPOINT_URL), output.region and the network"
    return "check output.store, output.endpoint_url and output.region"


def uploads_inputs(config: RunConfig, provider: str) -> bool:
    """Whether local images go up as URLs: ``inputs.upload``, by default on for ImaRouter with
    a store (its base64 form fails upstream on some models; Kling's native API takes it)."""
    if config.inputs.upload is not None:
        return config.inputs.upload and config.output.store is not None
    return config.output.store is not None and provider == "imarouter"


def input_link_seconds(task_timeout: float) -> float:
    """How long an input image's link stays valid: twice the task deadline, 6 h to 7 days."""
    return min(_INPUT_LINK_MAX, max(_INPUT_LINK_MIN, 2 * task_timeout))


class VideoUploads:
    """Puts a run's verified videos in its object store; the engine commits what it returns."""

    def __init__(self, store: ObjectStore, run_id: str, *, keep_local: bool,
                 concurrency: int = 4) -> None:
        self.store = store
        self.run_id = run_id
        self.keep_local = keep_local
        # Each upload holds up to CHUNK_SIZE × MAX_CONCURRENCY bytes: bound how many run at once.
        self.limiter = anyio.CapacityLimiter(concurrency)

    def uri(self, job_id: str) -> str:
        """Where the job's video goes."""
        return self.store.uri(video_key(self.run_id, job_id))

    async def staged(self, job: JobRow) -> Downloaded | None:
        """The verified local copy an earlier process recorded for this attempt (``job.fetched``)
        and did not confirm in the store, if it is still there and intact."""
        if job.state is not JobState.SUCCEEDED or not job.video_path or not job.video_sha256 \
                or job.video_size is None:
            return None
        path, size, sha256 = Path(job.video_path), job.video_size, job.video_sha256

        def intact() -> bool:
            try:
                if path.stat().st_size != size:
                    return False
                digest = hashlib.sha256()
                with path.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
            except OSError:
                return False
            return digest.hexdigest() == sha256

        return Downloaded(path, size, sha256) if await anyio.to_thread.run_sync(intact) else None

    async def put(self, job_id: str, video: Downloaded, *, check_existing: bool, clock: Clock,
                  backoff: Callable[[int], float]) -> StoredObject:
        """Store ``video`` as the job's object and return what the store confirmed.

        ``check_existing``: an earlier process may have uploaded it before it could commit;
        an object that already holds these bytes is adopted instead of uploaded again. An
        unavailable store is tried :data:`UPLOAD_TRIES` times with backoff; then, or at once
        for a refusal, the :class:`ObjectStoreError` is raised.
        """
        key = video_key(self.run_id, job_id)
        tries = 0
        async with self.limiter:
            while True:
                tries += 1
                try:
                    if check_existing:
                        found = await self.store.find_copy(key, video.path)
                        if found is not None and found.sha256 == video.sha256:
                            return found
                        check_existing = False
                    return await self.store.upload_file(key, video.path,
                                                        content_type="video/mp4",
                                                        expect_sha256=video.sha256)
                except ObjectStoreError as exc:
                    if not exc.retryable or tries >= UPLOAD_TRIES:
                        raise
                    await clock.sleep(backoff(tries))

    async def discard(self, path: Path) -> None:
        """Delete the local copy once the store holds the video (``keep_local: false``)."""

        def unlink() -> None:
            # A copy left behind (a permission problem) costs disk, never correctness.
            with contextlib.suppress(OSError):
                path.unlink()

        await anyio.to_thread.run_sync(unlink)


class InputImages:
    """Turns a job's local images into pre-signed URLs of the store (or, without a store,
    leaves them for the provider's base64 form, warning once per invocation why that is
    riskier). Each distinct file is read, checked against its recorded sha256 and uploaded
    once; its link is signed again when half its life is gone."""

    def __init__(self, store: ObjectStore | None, *, link_seconds: float, warn: bool,
                 log: Any) -> None:
        self.store = store
        self.link = timedelta(seconds=link_seconds)
        self.warn = warn
        self.log = log
        self.uploaded = 0  # PUTs made (an image already in the store costs a HEAD only)
        self._stored: set[str] = set()
        self._links: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._warned = False

    async def resolve(self, spec: JobSpec) -> JobSpec:
        """``spec`` with its local images replaced by URLs; raises :class:`ObjectStoreError`
        (the store) or :class:`TaskFailed` (the file is unreadable or changed since the
        manifest was read)."""
        local = {name: (source, sha) for name, source, sha in (
            ("image", spec.image, spec.image_sha256),
            ("image_tail", spec.image_tail, spec.image_tail_sha256),
        ) if source and sha and not source.startswith(("http://", "https://"))}
        if not local:
            return spec
        if self.store is None:
            if self.warn and not self._warned:
                self._warned = True
                self.log.warning(
                    "run.images_as_data_uri",
                    reason="local images go to the provider as base64 data URIs, which fail "
                    "upstream on some models (API.md); set output.store: s3://bucket/prefix/ "
                    "so they are uploaded once and sent as https URLs")
            return spec
        urls: dict[str, Any] = {name: await self._url(self.store, Path(source), sha)
                                for name, (source, sha) in local.items()}
        return dataclasses.replace(spec, **urls)

    async def _url(self, store: ObjectStore, path: Path, sha256: str) -> str:
        link = self._links.get(sha256)
        if link is not None and link[1] > time.monotonic():
            return link[0]
        lock = self._locks.setdefault(sha256, anyio.Lock())
        async with lock:  # two jobs on one image: one upload
            link = self._links.get(sha256)
            if link is not None and link[1] > time.monotonic():
                return link[0]
            key = input_key(sha256, path.suffix)
            if sha256 not in self._stored:
                await self._upload(store, key, path, sha256)
                self._stored.add(sha256)
            (url,) = await store.presign([key], self.link)
            self._links[sha256] = (url, time.monotonic() + self.link.total_seconds() / 2)
            return url

    async def _upload(self, store: ObjectStore, key: str, path: Path, sha256: str) -> None:
        try:
            data = await anyio.Path(path).read_bytes()
        except OSError as exc:
            raise TaskFailed(f"cannot read image: {exc.strerror or exc}: {path}",
                             retryable=False) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise TaskFailed(f"image {path} changed since the manifest was read: run the "
                             "manifest again to send the new version", retryable=False)
        if await store.holds(key, data):
            return  # uploaded before (by this run or another): keyed by content
        await store.put_bytes(key, data, content_type=content_type(path))
        self.uploaded += 1
