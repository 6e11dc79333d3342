"""Result videos: distinct small MP4 files, signed expiring URLs, and the file endpoint.

Each result is a real 2-second H.264 clip (one per aspect ratio, shipped in ``assets/``) followed
by a top-level ``free`` box naming the task, so every task's file has its own bytes and sha256
while staying a valid, playable MP4.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from batchkling.simulator.responses import BrokenResponse
from batchkling.simulator.state import COMPLETED, SimState, Task

_CLIPS = {"16:9": "sample_16x9.mp4", "9:16": "sample_9x16.mp4", "1:1": "sample_1x1.mp4"}
MP4 = "video/mp4"


@functools.cache
def base_clip(size: str) -> bytes:
    """The shipped clip for an aspect ratio (16:9 for anything unknown)."""
    name = _CLIPS.get(size, _CLIPS["16:9"])
    return (resources.files("batchkling.simulator") / "assets" / name).read_bytes()


def video_bytes(task: Task) -> bytes:
    """The task's result file: the clip plus a ``free`` box carrying the task id."""
    payload = f"batchkling-simulator task_id={task.task_id}".encode()
    return base_clip(task.spec.size) + struct.pack(">I", 8 + len(payload)) + b"free" + payload


def video_size(task: Task) -> int:
    """Byte length of ``video_bytes(task)`` without building it."""
    return len(base_clip(task.spec.size)) + 8 + len(f"batchkling-simulator task_id={task.task_id}")


def _sign(sim: SimState, task_id: str, exp: int) -> str:
    msg = f"{task_id}:{exp}".encode()
    return hmac.new(sim.url_secret, msg, hashlib.sha256).hexdigest()[:32]


def result_url(sim: SimState, task: Task, base: str, now: float) -> str:
    """A fresh signed URL for the task's video; ``exp`` is sim milliseconds, 0 for never."""
    ttl = sim.config.url_ttl_s
    exp = 0 if ttl is None else int((now + ttl) * 1000)
    return f"{base}/_sim/files/{task.task_id}.mp4?exp={exp}&sig={_sign(sim, task.task_id, exp)}"


def _denied(message: str) -> Response:
    # Object stores answer expired or forged links with an XML 403, not the API's JSON.
    body = f"<Error><Code>AccessDenied</Code><Message>{message}</Message></Error>"
    return Response(body, status_code=403, media_type="application/xml")


def video_response(sim: SimState, task: Task) -> Response:
    """The MP4, or (``download_truncate_rate``) a response that stops short of Content-Length."""
    sim.counters.downloads += 1
    data = video_bytes(task)
    headers = {"Content-Disposition": f'inline; filename="{task.task_id}.mp4"'}
    if sim.draw_truncate():
        sim.reject("truncated_download")
        return BrokenResponse(data, len(data) * 3 // 5, media_type=MP4, headers=headers)
    return Response(data, media_type=MP4, headers=headers)


async def serve_file(request: Request) -> Response:
    """``GET /_sim/files/{task_id}.mp4?exp=&sig=``: the signed download (no auth, like a CDN)."""
    sim: SimState = request.app.state.sim
    name: str = request.path_params["name"]
    task_id = name.removesuffix(".mp4")
    try:
        exp = int(request.query_params.get("exp", ""))
    except ValueError:
        return _denied("Missing or malformed exp")
    sig = request.query_params.get("sig", "")
    if not hmac.compare_digest(sig, _sign(sim, task_id, exp)):
        sim.reject("bad_signature")
        return _denied("Signature does not match")
    now = sim.sim_now()
    if exp and now * 1000 > exp:
        sim.reject("url_expired")
        return _denied("Request has expired")
    task = sim.tasks.get(task_id)
    if task is None or sim.status(task, now) != COMPLETED:
        return Response("Not Found", status_code=404, media_type="text/plain")
    return video_response(sim, task)
