"""Helpers for the simulator tests: a fake clock and an in-process client for both API shapes."""

from __future__ import annotations

import base64
import io
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import jwt

from batchkling.simulator import SimConfig, create_app
from batchkling.simulator.state import SimState

IMA_KEY = "sk-test"
IMA_AUTH = {"Authorization": f"Bearer {IMA_KEY}"}
ACCESS, SECRET = "sim-access-key", "sim-secret-key"


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sign(access: str = ACCESS, secret: str = SECRET, *, now: float | None = None,
         exp_in: float = 1800, nbf_ago: float = 5, **claims: Any) -> str:
    """A Kling JWT as API.md §2 describes it."""
    now = time.time() if now is None else now
    payload = {"iss": access, "exp": int(now + exp_in), "nbf": int(now - nbf_ago), **claims}
    with warnings.catch_warnings():  # the documented default secret is shorter than 32 bytes
        warnings.simplefilter("ignore")
        return jwt.encode(payload, secret, algorithm="HS256", headers={"typ": "JWT"})


def png_b64(width: int = 400, height: int = 400, fmt: str = "PNG") -> str:
    """A valid image as raw base64."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def has_ftyp(data: bytes) -> bool:
    """An MP4 starts with a box whose type is ``ftyp``."""
    return len(data) >= 8 and data[4:8] == b"ftyp"


class Sim:
    """The simulator app on a fake clock, with a client for it (``async with Sim(...) as sim``)."""

    def __init__(self, config: SimConfig | None = None, *, journal: Path | None = None,
                 **changes: Any) -> None:
        self.clock = FakeClock()
        self.app = create_app((config or SimConfig()).replace(**changes), clock=self.clock,
                              journal=journal)
        self.state: SimState = self.app.state.sim
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                        base_url="http://testserver")

    async def __aenter__(self) -> Sim:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.client.aclose()

    def advance(self, seconds: float) -> None:
        """Move simulated time on (at speed 1, sim seconds = clock seconds)."""
        self.clock.advance(seconds)

    def token(self, **kw: Any) -> str:
        """A JWT valid at the simulator's current wall time."""
        return sign(now=self.state.wall_now(), **kw)

    async def ima_create(self, headers: dict[str, str] | None = None, **body: Any
                         ) -> httpx.Response:
        """POST /v1/videos with sensible defaults for missing fields."""
        body = {"model": "kling-v2-6", "prompt": "a red fox in snow", "duration": 5,
                "size": "16:9", **body}
        return await self.client.post("/v1/videos", json=body,
                                      headers=IMA_AUTH if headers is None else headers)

    async def ima_get(self, task_id: str, headers: dict[str, str] | None = None
                      ) -> httpx.Response:
        """GET /v1/videos/{task_id}."""
        return await self.client.get(f"/v1/videos/{task_id}",
                                     headers=IMA_AUTH if headers is None else headers)

    async def kling_create(self, kind: str = "text2video", token: str | None = None,
                           **body: Any) -> httpx.Response:
        """POST /v1/videos/{kind} with a fresh JWT unless ``token`` is given."""
        body = {"model_name": "kling-v2-6", "prompt": "a red fox in snow", "duration": "5",
                **body}
        auth = {"Authorization": f"Bearer {token or self.token()}"}
        return await self.client.post(f"/v1/videos/{kind}", json=body, headers=auth)

    async def kling_get(self, ident: str, kind: str = "text2video", token: str | None = None
                        ) -> httpx.Response:
        """GET /v1/videos/{kind}/{ident}."""
        auth = {"Authorization": f"Bearer {token or self.token()}"}
        return await self.client.get(f"/v1/videos/{kind}/{ident}", headers=auth)

    async def stats(self) -> dict[str, Any]:
        """GET /_sim/stats."""
        data: dict[str, Any] = (await self.client.get("/_sim/stats")).json()
        return data
