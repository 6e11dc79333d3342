"""The Kling native shape (API.md §2): JWT auth, ``{code, message, request_id, data}`` envelopes."""

from __future__ import annotations

import hmac
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.utils import base64url_decode
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from batchkling.simulator.catalog import (
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
)
from batchkling.simulator.media import result_url
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

SHAPE = "kling"
KINDS = ("text2video", "image2video")
_STATUS = {QUEUED: "submitted", IN_PROGRESS: "processing", COMPLETED: "succeed", FAILED: "failed"}
_FAIL_MSG = {
    "content_policy": "Failure to pass the risk control system",
    "internal": "Internal error, please try again later",
}
_JWT_CACHE_MAX = 4096


class KlingError(Exception):
    """A Kling error answer: business ``code``, HTTP ``status`` and message."""

    def __init__(self, code: int, status: int, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


def envelope(sim: SimState, data: Any, *, code: int = 0, message: str = "SUCCEED",
             status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Kling's ``{code, message, request_id, data}`` answer."""
    body = {"code": code, "message": message, "request_id": sim.next_request_id(), "data": data}
    return json_response(body, status, headers)


def fail(sim: SimState, exc: KlingError, reason: str, headers: dict[str, str] | None = None
         ) -> Response:
    """Count the refusal and answer it in the envelope."""
    sim.reject(reason)
    return envelope(sim, None, code=exc.code, message=exc.message, status=exc.status,
                    headers=headers)


_HS256 = HMACAlgorithm(HMACAlgorithm.SHA256)


def _verify_hs256(token: str, secret: str) -> dict[str, Any]:
    """The claims of an HS256 token signed with ``secret``; raises on anything else.

    The signature is checked with PyJWT's HMAC primitive rather than ``jwt.decode`` because the
    documented default secret is short and ``jwt.decode`` warns about that on every call.
    """
    if jwt.get_unverified_header(token).get("alg") != "HS256":
        raise jwt.InvalidAlgorithmError("the algorithm must be HS256")
    signing_input, _, signature = token.rpartition(".")
    if not _HS256.verify(signing_input.encode(), _HS256.prepare_key(secret),
                         base64url_decode(signature)):
        raise jwt.InvalidSignatureError("signature verification failed")
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    for claim in ("iss", "exp"):
        if claim not in claims:
            raise jwt.MissingRequiredClaimError(claim)
    return claims


def check_token(sim: SimState, token: str | None) -> KlingError | None:
    """Verify a bearer: the account's API key, or an HS256 JWT with iss = access key, nbf, exp.

    Time claims are checked against the simulator's wall clock so a fake clock can expire them.
    Verified signatures are cached per (token, keys) so polls do not pay for HMAC every time.
    """
    cfg = sim.config
    if token is None:
        return KlingError(1001, 401, "Authorization header is empty")
    if cfg.api_key is not None and hmac.compare_digest(token, cfg.api_key):
        return None
    cache: dict[tuple[str, str, str], dict[str, Any]] = sim.jwt_cache
    cache_key = (token, cfg.access_key, cfg.secret_key)
    claims = cache.get(cache_key)
    if claims is None:
        try:
            claims = _verify_hs256(token, cfg.secret_key)
        except (jwt.InvalidTokenError, ValueError) as exc:
            return KlingError(1002, 401, f"Authorization token is invalid: {exc}")
        if claims.get("iss") != cfg.access_key:
            return KlingError(1002, 401, "Authorization token is invalid: unknown access key (iss)")
        if len(cache) >= _JWT_CACHE_MAX:
            cache.clear()
        cache[cache_key] = claims
    now = sim.wall_now()
    nbf, exp = claims.get("nbf"), claims.get("exp")
    if isinstance(nbf, int | float) and nbf > now:
        return KlingError(1003, 401, "Authorization token is not yet valid (nbf is in the future)")
    if not isinstance(exp, int | float) or exp <= now:
        return KlingError(1004, 401, "Authorization token has expired; sign a new one")
    return None


def parse_request(kind: str, body: Any, *, decode_images: bool,
                  models: tuple[str, ...] = MODELS) -> tuple[Spec, dict[str, Any]]:
    """Validate a text2video/image2video body; raises KlingError 1200/1201/1203."""
    if not isinstance(body, dict):
        raise KlingError(1200, 400, "Invalid request: the body must be a JSON object")
    model = body.get("model_name", "kling-v1")
    if model not in models:
        raise KlingError(1203, 404, f"model_name {model!r} does not exist; "
                                    f"available: {', '.join(models)}")
    try:
        duration = body.get("duration", "5")
        if not isinstance(duration, str):
            raise Invalid("duration", f'duration must be the string "5" or "10" '
                                      f"(got {type(duration).__name__} {duration!r})")
        check_choice("duration", duration, ("5", "10"))
        size = check_choice("aspect_ratio", body.get("aspect_ratio", "16:9"), SIZES)
        mode = check_choice("mode", body.get("mode", "std"), MODES)
        image, tail = body.get("image"), body.get("image_tail")
        if kind == "image2video":
            if not image and not tail:
                raise Invalid("image", "image or image_tail is required for image2video")
            for field, value in (("image", image), ("image_tail", tail)):
                if value:
                    check_image(field, value, data_uri_ok=False, decode=decode_images)
            if tail and body.get("camera_control"):
                raise Invalid("camera_control", "image_tail cannot be combined with camera_control")
            if tail and (body.get("static_mask") or body.get("dynamic_masks")):
                raise Invalid("image_tail", "image_tail cannot be combined with masks")
        prompt = check_text("prompt", body.get("prompt"), required=kind == "text2video")
        check_text("negative_prompt", body.get("negative_prompt"), required=False)
        check_cfg_scale(body.get("cfg_scale"), model)
        check_sound(body.get("sound"), model)
        for name in ("callback_url", "external_task_id"):
            value = body.get(name)
            if value is not None and (not isinstance(value, str) or not value):
                raise Invalid(name, f"{name} must be a non-empty string")
    except Invalid as exc:
        raise KlingError(1201, 400, f"Invalid request parameters: {exc.message}") from exc
    has_tail = kind == "image2video" and bool(tail)
    sound = body.get("sound")
    return Spec(kind, model, int(duration), size, mode, prompt, has_tail,
                sound if isinstance(sound, str) else None), body


def task_data(sim: SimState, task: Task, now: float, base: str) -> dict[str, Any]:
    """The task as Kling's query endpoint reports it at sim time ``now``."""
    state = sim.status(task, now)
    spec = task.spec
    ext = task.external_task_id
    data: dict[str, Any] = {
        "task_id": task.task_id,
        "task_status": _STATUS[state],
        "task_status_msg": "",
        "task_info": {"external_task_id": ext} if ext else {},
        "task_result": {},
        "created_at": int(task.created_wall * 1000),
        "updated_at": int(sim.sim_to_wall(sim.status_changed_at(task, now)) * 1000),
    }
    if state == COMPLETED:
        url = result_url(sim, task, base, now)
        data["task_result"] = {"videos": [
            {"id": f"{task.task_id}0", "url": url, "duration": f"{spec.duration + 0.042:.3f}"}]}
        data["final_unit_deduction"] = sim.charge_units(spec)
    elif state == FAILED:
        data["task_status_msg"] = _FAIL_MSG[task.outcome]
        data["final_unit_deduction"] = "0"
    return data


async def create(request: Request) -> Response:
    """``POST /v1/videos/{text2video|image2video}``."""
    sim: SimState = request.app.state.sim
    cfg = sim.config
    kind = _kind(request)
    try:
        body: Any = await read_json(request)
    except ValueError as exc:
        body, bad_json = None, str(exc)
    else:
        bad_json = ""
    external = body.get("external_task_id") if isinstance(body, dict) else None
    external = external if isinstance(external, str) and external else None
    sim.count_create_request(external)
    if (denied := check_token(sim, bearer(request))) is not None:
        return fail(sim, denied, "auth")
    if not sim.take_rate_token():
        return fail(sim, KlingError(1302, 429, "Request rate is too high; slow down"),
                    "rate_limited", {"Retry-After": retry_after(cfg.retry_after_s)})
    if bad_json:
        return fail(sim, KlingError(1200, 400, f"Invalid request: {bad_json}"), "invalid")
    try:
        spec, body = parse_request(kind, body, decode_images=cfg.validate_images,
                                   models=sim.models)
    except KlingError as exc:
        return fail(sim, exc, "invalid")
    sim.note_images(body.get("image"), body.get("image_tail"))
    if FORBIDDEN_WORD.search(spec.prompt):
        return fail(sim, KlingError(1301, 400, "The prompt violates the content policy"),
                    "content_policy")
    if external is not None and external in sim.by_external:
        return fail(sim, KlingError(1201, 400, f"external_task_id {external!r} is duplicated: "
                                               "a task with it already exists"),
                    "duplicate_external_id")
    if sim.out_of_credit():
        return fail(sim, KlingError(1102, 429, "Account balance is insufficient: "
                                               "the resource pack is depleted or expired"),
                    "credits")
    if sim.slots_full():
        return fail(sim, KlingError(1303, 429, "Parallel tasks exceed the resource pack limit "
                                               f"({cfg.slot_limit})"), "slots")
    faults = sim.draw_create_faults()
    if faults.status_before is not None:
        return fail(sim, _server_error(faults.status_before), "server_error")
    base = base_url(request)
    task = sim.create_task(SHAPE, spec, key=external, external_task_id=external,
                           callback_url=body.get("callback_url"), base=base)
    if faults.status_after is not None:
        return fail(sim, _server_error(faults.status_after), "server_error_after_create")
    if faults.hang:
        sim.reject("hung_after_create")
        await hold(request, cfg.hang_s)
    data = task_data(sim, task, task.created_sim, base)
    for late in ("task_result", "task_status_msg"):
        data.pop(late)
    return envelope(sim, data)


def _server_error(status: int) -> KlingError:
    if status == 503:
        return KlingError(5001, 503, "Service is under maintenance; try again later")
    return KlingError(5000, 500, "Internal server error")


async def retrieve(request: Request) -> Response:
    """``GET /v1/videos/{kind}/{task_id_or_external_task_id}``."""
    sim: SimState = request.app.state.sim
    sim.counters.polls += 1
    if (denied := check_token(sim, bearer(request))) is not None:
        return fail(sim, denied, "auth")
    now = sim.sim_now()
    sim.prune(now)
    fault = sim.draw_poll_fault()
    kind, ident = _kind(request), request.path_params["ident"]
    task = sim.tasks.get(ident) or sim.by_external.get(ident)
    if task is None or task.spec.kind != kind:
        return fail(sim, KlingError(1201, 404, f"Task not found: {ident}"), "not_found")
    if isinstance(fault, int):
        return fail(sim, _server_error(fault), "server_error")
    if fault == "drop":
        sim.reject("dropped")
        return dropped_json({"code": 0, "message": "SUCCEED", "request_id": sim.next_request_id(),
                             "data": task_data(sim, task, now, base_url(request))})
    sim.observed(task, now)
    return envelope(sim, task_data(sim, task, now, base_url(request)))


def _page_arg(request: Request, name: str, default: int, high: int) -> int:
    raw = request.query_params.get(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= high:
        raise KlingError(1201, 400, f"Invalid request parameters: {name} must be 1..{high}")
    return value


async def list_tasks(request: Request) -> Response:
    """``GET /v1/videos/{kind}?pageNum=&pageSize=``: that kind's tasks, newest first."""
    sim: SimState = request.app.state.sim
    sim.counters.lists += 1
    if (denied := check_token(sim, bearer(request))) is not None:
        return fail(sim, denied, "auth")
    kind = _kind(request)
    try:
        page = _page_arg(request, "pageNum", 1, 1000)
        size = _page_arg(request, "pageSize", 30, 500)
    except KlingError as exc:
        return fail(sim, exc, "invalid")
    now, base = sim.sim_now(), base_url(request)
    fault = sim.draw_poll_fault()  # a list is a status query: it fails like one
    if isinstance(fault, int):
        return fail(sim, _server_error(fault), "server_error")
    matching = [t for t in reversed(sim.tasks.values()) if t.spec.kind == kind]
    chosen = matching[(page - 1) * size: page * size]
    data = [task_data(sim, t, now, base) for t in chosen]
    if fault == "drop":
        sim.reject("dropped")
        return dropped_json({"code": 0, "message": "SUCCEED",
                             "request_id": sim.next_request_id(), "data": data})
    for task in chosen:
        sim.observed(task, now)
    return envelope(sim, data)


def _kind(request: Request) -> str:
    # Paths are /v1/videos/<kind>[/<id>]; the routes below only match the two known kinds.
    path: str = request.scope["path"]
    return path.split("/")[3]


routes = [
    route
    for kind in KINDS
    for route in (
        Route(f"/v1/videos/{kind}", create, methods=["POST"]),
        Route(f"/v1/videos/{kind}", list_tasks, methods=["GET"]),
        Route(f"/v1/videos/{kind}/{{ident}}", retrieve, methods=["GET"]),
    )
]
