"""The ImaRouter shape (API.md §1): ``/v1/videos`` create, poll and content, quirks on demand."""

from __future__ import annotations

import hmac
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from batchkling.simulator.catalog import (
    DURATIONS,
    FORBIDDEN_WORD,
    MODELS,
    MODES,
    SIZES,
    Invalid,
    Spec,
    check_cfg_scale,
    check_choice,
    check_image,
    check_sound,
    check_text,
    dimensions,
)
from batchkling.simulator.media import result_url, video_response, video_size
from batchkling.simulator.responses import (
    base_url,
    bearer,
    dropped_json,
    hold,
    json_response,
    read_json,
    retry_after,
)
from batchkling.simulator.state import COMPLETED, FAILED, IN_PROGRESS, QUEUED, SimState, Task

SHAPE = "imarouter"

_SYNONYMS = {
    QUEUED: ("queued", "pending", "submitted", "NOT_START"),
    IN_PROGRESS: ("in_progress", "processing", "rendering"),  # "rendering": unknown = running
    COMPLETED: ("completed", "succeeded", "succeed", "success"),
    FAILED: ("failed", "error", "canceled", "cancelled"),
}
_FAILURES = {
    "content_policy": (
        "content_policy_violation",
        "The generated video was blocked by content moderation (upstream Kling 1301); "
        "not retryable with the same prompt and images.",
    ),
    "internal": (
        "upstream_error",
        "Upstream render failed with an internal error (Kling 5000); a new attempt may succeed.",
    ),
}


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """ImaRouter's error body: ``{code, message, data}``."""
    return json_response({"code": code, "message": message, "data": None}, status, headers)


def _auth(sim: SimState, request: Request) -> Response | None:
    token = bearer(request)
    expected = sim.config.api_key
    if token is None:
        message = "Invalid API key: missing 'Authorization: Bearer <key>' header"
    elif expected is not None and not hmac.compare_digest(token, expected):
        message = "Invalid API key: the bearer key is not valid for this account"
    else:
        return None
    sim.reject("auth")
    return error(401, "invalid_api_key", message)


def _duration(value: Any) -> int:
    # The real API takes 5, "5" and 5.0 alike; anything else names the allowed values.
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if isinstance(value, bool) or number not in DURATIONS:
        raise Invalid("duration", f"duration must be one of 5, 10 (got {value!r})")
    return int(number)


def parse_request(body: Any, *, decode_images: bool, models: tuple[str, ...] = MODELS
                  ) -> tuple[Spec, dict[str, Any]]:
    """Validate a create body like the gateway does; returns the spec and the metadata."""
    if not isinstance(body, dict):
        raise Invalid("body", "request body must be a JSON object")
    model = check_choice("model", body.get("model"), models)
    duration = _duration(body.get("duration", 5))
    size = check_choice("size", body.get("size", "16:9"), SIZES)
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise Invalid("metadata", "metadata must be a JSON object")
    mode = check_choice("metadata.mode", metadata.get("mode", "std"), MODES)
    image, tail = body.get("image"), metadata.get("image_tail")
    if tail is not None and image is None:
        raise Invalid("metadata.image_tail", "metadata.image_tail needs image (the first frame)")
    prompt = check_text("prompt", body.get("prompt"), required=image is None)
    if image is not None:
        check_image("image", image, data_uri_ok=True, decode=decode_images)
    if tail is not None:
        check_image("metadata.image_tail", tail, data_uri_ok=True, decode=decode_images)
    check_text("metadata.negative_prompt", metadata.get("negative_prompt"), required=False)
    check_cfg_scale(metadata.get("cfg_scale"), model)
    check_sound(metadata.get("sound"), model)
    for name in ("callback_url", "external_task_id"):
        value = metadata.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise Invalid(f"metadata.{name}", f"metadata.{name} must be a non-empty string")
    kind = "image2video" if image is not None else "text2video"
    sound = metadata.get("sound")
    return Spec(kind, model, duration, size, mode, prompt, tail is not None,
                sound if isinstance(sound, str) else None), metadata


def video_object(sim: SimState, task: Task, now: float, base: str, *, observe: bool) -> Any:
    """The task as ImaRouter reports it at sim time ``now``; ``observe`` marks a real poll."""
    cfg, spec, tid = sim.config, task.spec, task.task_id
    state = sim.status(task, now)
    progress = sim.progress(task, now)

    def stamp(wall: float) -> int:
        return int(wall * 1000) if cfg.quirk_ms_timestamps else int(wall)

    names = _SYNONYMS[state] if cfg.quirk_status_synonyms else (state,)
    obj: dict[str, Any] = {
        "id": tid,
        "task_id": tid,
        "object": "video",
        "model": spec.model,
        "status": names[task.pick % len(names)],
        "progress": f"{progress}%" if cfg.quirk_progress_string else progress,
        "created_at": stamp(task.created_wall),
        "completed_at": None,
        "seconds": str(spec.duration),
        "size": spec.size,
        "metadata": {"mode": spec.mode},
    }
    if state in (COMPLETED, FAILED):
        # The gateway records an end when it first sees it, at one of its looks.
        obj["completed_at"] = stamp(sim.sim_to_wall(sim.gateway_saw(task.ends_sim)))
    if state == COMPLETED:
        obj["amount_usd"] = sim.charge_usd(spec)
        obj["usage"] = {"duration_seconds": spec.duration}
        hide = cfg.quirk_completed_without_url and not task.completion_seen
        if observe:
            task.completion_seen = True
        if not hide:
            url = result_url(sim, task, base, now)
            width, height = dimensions(spec.size, spec.mode)
            obj["metadata"]["url"] = url
            obj["results"] = [{"url": url, "width": width, "height": height,
                               "duration": spec.duration + 0.042, "size": video_size(task),
                               "content_type": "video/mp4"}]
    elif state == FAILED:
        obj["amount_usd"] = 0.0
        code, message = _FAILURES[task.outcome]
        where = task.pick % 3 if cfg.quirk_fail_reason_fields else 0
        if where == 0:
            obj["error"] = {"code": code, "message": message}
        else:
            obj["fail_reason" if where == 1 else "task_status_msg"] = message
    return {"code": 0, "message": "success", "data": obj} if cfg.quirk_wrapped else obj


async def create(request: Request) -> Response:
    """``POST /v1/videos``: admit, validate, dedupe by key, then create (faults permitting)."""
    sim: SimState = request.app.state.sim
    cfg = sim.config
    try:
        body: Any = await read_json(request)
    except ValueError as exc:
        body, bad_json = None, str(exc)
    else:
        bad_json = ""
    metadata = body.get("metadata") if isinstance(body, dict) else None
    external = metadata.get("external_task_id") if isinstance(metadata, dict) else None
    external = external if isinstance(external, str) and external else None
    idem = request.headers.get("idempotency-key") or None
    key = idem or external
    sim.count_create_request(key)
    if (denied := _auth(sim, request)) is not None:
        return denied
    if not sim.take_rate_token():
        sim.reject("rate_limited")
        return error(429, "rate_limit_exceeded",
                     "Rate limit exceeded for video creation; retry after the Retry-After delay",
                     {"Retry-After": retry_after(cfg.retry_after_s)})
    if bad_json:
        sim.reject("invalid")
        return error(400, "invalid_request", bad_json)
    try:
        spec, meta = parse_request(body, decode_images=cfg.validate_images, models=sim.models)
    except Invalid as exc:
        sim.reject("invalid")
        return error(400, "invalid_request", exc.message)
    sim.note_images(body.get("image"), meta.get("image_tail"))
    if FORBIDDEN_WORD.search(spec.prompt):
        sim.reject("content_policy")
        return error(400, "content_policy_violation",
                     "The prompt was refused by content moderation (upstream Kling 1301)")
    base = base_url(request)
    if cfg.honor_idempotency_key:
        existing = (sim.by_idem.get(idem) if idem else None) or (
            sim.by_external.get(external) if external else None)
        if existing is not None:
            sim.counters.replays += 1
            return json_response(video_object(sim, existing, sim.sim_now(), base, observe=False))
    if sim.out_of_credit():
        sim.reject("credits")
        return error(402, "insufficient_quota",
                     "Insufficient quota: the account balance cannot pay for this task")
    account = sim.account_of(bearer(request))
    if sim.slots_full(account):
        sim.reject("slots")
        limit = cfg.slot_limit if account is None else sim.account_limits[account]
        return error(429, "concurrency_limit_exceeded",
                     f"Concurrency limit exceeded: the account's parallel task limit "
                     f"({limit}) is reached; retry when a task finishes")
    faults = sim.draw_create_faults()
    if faults.status_before is not None:
        sim.reject("server_error")
        return error(faults.status_before, "upstream_error", "Upstream service error; try again")
    task = sim.create_task(SHAPE, spec, key=key, external_task_id=external, idempotency_key=idem,
                           callback_url=meta.get("callback_url"), base=base, account=account)
    if faults.status_after is not None:
        sim.reject("server_error_after_create")
        return error(faults.status_after, "upstream_error", "Upstream service error; try again")
    if faults.hang:
        sim.reject("hung_after_create")
        await hold(request, cfg.hang_s)
    obj = video_object(sim, task, task.created_sim, base, observe=False)
    return json_response(obj)


async def retrieve(request: Request) -> Response:
    """``GET /v1/videos/{task_id}``: the task's state now, or a drawn poll fault."""
    sim: SimState = request.app.state.sim
    sim.counters.polls += 1
    if (denied := _auth(sim, request)) is not None:
        return denied
    cfg = sim.config
    now = sim.sim_now()
    sim.prune(now)
    fault = sim.draw_poll_fault()
    task = sim.tasks.get(request.path_params["task_id"])
    if task is None or (cfg.quirk_404_after_create_s
                        and now - task.created_sim < cfg.quirk_404_after_create_s):
        sim.reject("not_found")
        return error(404, "task_not_found", f"Task {request.path_params['task_id']} not found")
    if isinstance(fault, int):
        sim.reject("server_error")
        return error(fault, "upstream_error", "Upstream service error; try again")
    headers = None
    shown = sim.refreshed(task, now)
    if cfg.poll_after_s is not None and sim.status(task, shown) in (QUEUED, IN_PROGRESS):
        headers = {"openai-poll-after-ms": str(int(cfg.poll_after_s / cfg.speed * 1000))}
    obj = video_object(sim, task, shown, base_url(request), observe=fault is None)
    if fault is None:
        sim.observed(task, now, shown)
    if fault == "drop":
        sim.reject("dropped")
        return dropped_json(obj)
    return json_response(obj, headers=headers)


async def content(request: Request) -> Response:
    """``GET /v1/videos/{task_id}/content``: the MP4 of a completed task."""
    sim: SimState = request.app.state.sim
    if (denied := _auth(sim, request)) is not None:
        return denied
    tid = request.path_params["task_id"]
    task = sim.tasks.get(tid)
    if task is None:
        return error(404, "task_not_found", f"Task {tid} not found")
    state = sim.status(task, sim.sim_now())
    if state != COMPLETED:
        return error(400, "invalid_request", f"Video {tid} is not ready (status {state})")
    return video_response(sim, task)


routes = [
    Route("/v1/videos", create, methods=["POST"]),
    Route("/v1/videos/{task_id}", retrieve, methods=["GET"]),
    Route("/v1/videos/{task_id}/content", content, methods=["GET"]),
    # The legacy pair takes the same body (API.md §1); kept so old clients work too.
    Route("/v1/video/generations", create, methods=["POST"]),
    Route("/v1/video/generations/{task_id}", retrieve, methods=["GET"]),
]
