"""``reuse: earlier-runs``: a job whose request already produced a verified video is not paid for
again — the engine takes that video instead of rendering (docs/money.md).

The store finds, for each pending job, downloaded videos of other runs with the same fingerprint
(the canonical request, local images by content). This module makes one usable here:

- a local file is hard-linked into the run's ``videos/`` folder (copied where a link is not
  possible: another filesystem) and its sha256 checked against the one recorded when it was
  downloaded — a file that changed since is never reused;
- a video that lives only in the object store is reused by its URI, once a HEAD in this run's
  store confirms the object is there with the recorded size and ETag.

Nothing here changes a job's state: the engine commits the result (``Store.mark_reused``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from batchkling.errors import ObjectStoreError
from batchkling.outputs.objectstore import ObjectStore, key_of
from batchkling.store.rows import ReuseSource

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Reused:
    """Where the reused video is now: a verified local file and/or the earlier object."""

    video_path: str | None
    video_uri: str | None
    video_etag: str | None


async def take_video(source: ReuseSource, videos: Path,
                     objects: ObjectStore | None) -> Reused | None:
    """Make the earlier video of ``source`` this job's: None when it cannot be verified."""
    dest = videos / f"{source.job_id}.mp4"
    if source.video_path:
        linked = await anyio.to_thread.run_sync(
            link_verified, Path(source.video_path), dest, source.video_sha256)
        if linked:
            return Reused(str(dest), source.video_uri, source.video_etag)
    if source.video_uri and objects is not None and source.video_size is not None:
        key = key_of(source.video_uri, objects.where)
        if key is None:  # another bucket or prefix: this run's credentials may not reach it
            return None
        try:
            found = await objects.head(key)
        except ObjectStoreError:
            return None
        if found is None or found[0] != source.video_size:
            return None
        if source.video_etag and found[1] != source.video_etag:
            return None
        return Reused(None, source.video_uri, source.video_etag)
    return None


def link_verified(source: Path, dest: Path, sha256: str) -> bool:
    """Put ``source`` at ``dest`` (a hard link, else a copy) if its content hashes to
    ``sha256``; False, leaving ``dest`` as it was, if it does not or cannot be read."""
    if _sha256(source) != sha256:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{secrets.token_hex(4)}.part")
    try:
        try:
            os.link(source, part)
        except OSError:  # another filesystem, or links refused: copy and check the copy
            _copy(source, part)
            if _sha256(part) != sha256:
                return False
        os.replace(part, dest)
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            part.unlink()


def _copy(source: Path, dest: Path) -> None:
    with source.open("rb") as src, dest.open("wb") as out:
        while block := src.read(_CHUNK):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while block := fh.read(_CHUNK):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()
