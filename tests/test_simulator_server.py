"""The simulator over real loopback HTTP: the thread helper, faults on the wire, callbacks, CLI,
and a client written only from API.md completing tasks on both shapes."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
import warnings
from typing import Any

import anyio
import httpx
import jwt
import pytest
from sim_helpers import IMA_AUTH, Sim, png_b64

from batchkling.errors import BatchklingError
from batchkling.simulator import SimConfig, SimulatorServer, serve_forever
from batchkling.simulator.callbacks import deliver_due

pytestmark = pytest.mark.timeout(30)

FAST = SimConfig(speed=200.0, queue_s=1.0)  # median render 90 s → about half a second


class TestSimulatorServer:
    def test_serves_on_a_free_loopback_port(self) -> None:
        """It listens on 127.0.0.1, exposes base_url, stats() and update_config(), and stops."""
        with SimulatorServer(FAST) as server:
            assert server.base_url.startswith("http://127.0.0.1:")
            r = httpx.post(f"{server.base_url}/v1/videos", headers=IMA_AUTH,
                           json={"model": "kling-v1", "prompt": "p"})
            assert r.status_code == 200
            assert server.stats()["creates"] == 1 and server.tasks()[0]["shape"] == "imarouter"
            server.update_config(slot_limit=1)
            assert server.app.state.sim.config.slot_limit == 1
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.base_url}/_sim/health")
        server.stop()  # idempotent

    async def test_usable_inside_an_async_test(self) -> None:
        """It runs on its own thread and loop, so an async test can await a client against it."""
        with SimulatorServer(FAST) as server:
            async with httpx.AsyncClient(base_url=server.base_url) as client:
                assert (await client.get("/_sim/health")).json() == {"ok": True}
                assert server.stats()["creates"] == 0

    def test_drop_and_truncation_on_the_wire(self) -> None:
        """A dropped poll and a truncated download reach a real client as protocol errors."""
        with SimulatorServer(FAST.replace(poll_drop_rate=1.0)) as server, httpx.Client(
                base_url=server.base_url, headers=IMA_AUTH) as client:
            tid = client.post("/v1/videos", json={"model": "kling-v1", "prompt": "p",
                                                  "metadata": {"external_task_id": "x"}}
                              ).json()["task_id"]
            with pytest.raises(httpx.RemoteProtocolError):
                client.get(f"/v1/videos/{tid}")
            server.update_config(poll_drop_rate=0.0, download_truncate_rate=1.0)
            deadline = time.monotonic() + 10
            while (body := client.get(f"/v1/videos/{tid}").json())["status"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with pytest.raises(httpx.RemoteProtocolError):
                client.get(body["metadata"]["url"])

    def test_hang_trips_the_read_timeout(self) -> None:
        """A hang after create makes the client's read timeout fire while the task exists."""
        with SimulatorServer(FAST.replace(create_hang_after_create_rate=1.0, hang_s=5)) as server:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.base_url}/v1/videos", headers=IMA_AUTH, timeout=0.3,
                           json={"model": "kling-v1", "prompt": "p"})
            assert server.stats()["creates"] == 1


class TestCallbacks:
    async def test_posts_each_status_change(self) -> None:
        """deliver_due POSTs the task object once per new status, then stops for that task."""
        received: list[tuple[str, Any]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            import json

            received.append((str(request.url), json.loads(request.content)))
            return httpx.Response(200)

        async with Sim(render_median_s=10, render_sigma=0) as sim, httpx.AsyncClient(
                transport=httpx.MockTransport(handler)) as http:
            await sim.kling_create(callback_url="http://hooks.test/kling")
            await sim.ima_create(metadata={"callback_url": "http://hooks.test/ima"})
            assert await deliver_due(sim.state, http) == 2
            assert await deliver_due(sim.state, http) == 0
            sim.advance(5)
            await deliver_due(sim.state, http)
            sim.advance(100)
            await deliver_due(sim.state, http)
            kling = [p["task_status"] for u, p in received if u.endswith("/kling")]
            ima = [p["status"] for u, p in received if u.endswith("/ima")]
            assert kling == ["submitted", "processing", "succeed"]
            assert ima == ["queued", "in_progress", "completed"]
            assert sim.state.stats()["callbacks_sent"] == 6 and not sim.state.callback_pending

    async def test_failures_are_counted_not_raised(self) -> None:
        """A callback target that refuses is counted in callbacks_failed."""
        async with Sim() as sim, httpx.AsyncClient(
                transport=httpx.MockTransport(lambda r: httpx.Response(500))) as http:
            await sim.kling_create(callback_url="http://hooks.test/x")
            await deliver_due(sim.state, http)
            assert sim.state.stats()["callbacks_failed"] == 1

    async def test_background_loop_under_the_server(self) -> None:
        """Under SimulatorServer the loop delivers callbacks to /_sim/callback-sink on its own."""
        with SimulatorServer(FAST) as server:
            async with httpx.AsyncClient(base_url=server.base_url) as client:
                await client.post("/v1/videos", headers=IMA_AUTH, json={
                    "model": "kling-v1", "prompt": "p",
                    "metadata": {"callback_url": f"{server.base_url}/_sim/callback-sink"}})
                for _ in range(200):  # polling the server is the point here, not an event
                    inbox = (await client.get("/_sim/callback-sink")).json()
                    if len(inbox) >= 3:
                        break
                    await anyio.sleep(0.05)
                assert [b["status"] for b in inbox] == ["queued", "in_progress", "completed"]

    async def test_switch_off(self) -> None:
        """callbacks=False sends nothing."""
        async with Sim(callbacks=False) as sim, httpx.AsyncClient(
                transport=httpx.MockTransport(lambda r: httpx.Response(200))) as http:
            await sim.kling_create(callback_url="http://hooks.test/x")
            assert await deliver_due(sim.state, http) == 0


class TestServeForever:
    def test_bad_faults(self) -> None:
        """An unknown --faults raises BatchklingError before anything listens."""
        with pytest.raises(BatchklingError, match="no such fault profile"):
            serve_forever(host="127.0.0.1", port=0, speed=1.0, seed=0, faults="nope",
                          api_key=None, access_key=None, secret_key=None)

    def test_cli_startup_line(self) -> None:
        """`batchkling simulate` logs its base URL, both shapes and the Kling keys, then serves."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchkling", "simulate", "--port", "0", "--faults", "quirks"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            lines: list[str] = []
            assert proc.stdout is not None
            while not any("Kling shape" in line for line in lines):
                line = proc.stdout.readline()
                assert line, "".join(lines)
                lines.append(line)
            text = "".join(lines)
            assert "sim-access-key" in text and "sim-secret-key" in text and "/v1/videos" in text
            base = next(w for w in text.split() if w.startswith("http://127.0.0.1:"))
            assert httpx.get(f"{base}/_sim/health").status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=10)


# --- A client written only from API.md: no batchkling client code below, just httpx. -------

def _kling_jwt(access: str, secret: str) -> str:
    now = int(time.time())
    with warnings.catch_warnings():  # the simulator's documented secret is under 32 bytes
        warnings.simplefilter("ignore")
        return jwt.encode({"iss": access, "exp": now + 1800, "nbf": now - 5}, secret,
                          algorithm="HS256", headers={"alg": "HS256", "typ": "JWT"})


def _first_url(task: dict[str, Any]) -> str | None:
    """API.md §1: results[0].url, metadata.url, video.url, output[0].url, url, video_url."""
    candidates = [
        (task.get("results") or [{}])[0].get("url"),
        (task.get("metadata") or {}).get("url"),
        (task.get("video") or {}).get("url"),
        (task.get("output") or [{}])[0].get("url"),
        task.get("url"),
        task.get("video_url"),
    ]
    return next((c for c in candidates if c), None)


def _download_mp4(url: str) -> bytes:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == len(r.content)
    assert r.content[4:8] == b"ftyp"
    return r.content


def _imarouter_run(base: str, key: str, body: dict[str, Any]) -> bytes:
    headers = {"Authorization": f"Bearer {key}"}
    created = httpx.post(f"{base}/v1/videos", json=body, headers=headers, timeout=10)
    assert created.status_code == 200, created.text
    obj = created.json()
    task_id = obj.get("task_id") or obj["id"]
    deadline = time.monotonic() + 15
    while True:
        task = httpx.get(f"{base}/v1/videos/{task_id}", headers=headers, timeout=10).json()
        if task["status"] in ("completed", "failed"):
            break
        assert time.monotonic() < deadline, task
        time.sleep(0.05)
    assert task["status"] == "completed", task
    url = _first_url(task)
    assert url is not None
    return _download_mp4(url)


def _kling_run(base: str, kind: str, body: dict[str, Any]) -> bytes:
    headers = {"Authorization": f"Bearer {_kling_jwt('sim-access-key', 'sim-secret-key')}"}
    created = httpx.post(f"{base}/v1/videos/{kind}", json=body, headers=headers, timeout=10)
    envelope = created.json()
    assert envelope["code"] == 0, envelope
    task_id = envelope["data"]["task_id"]
    deadline = time.monotonic() + 15
    while True:
        data = httpx.get(f"{base}/v1/videos/{kind}/{task_id}", headers=headers,
                         timeout=10).json()["data"]
        if data["task_status"] in ("succeed", "failed"):
            break
        assert data["task_status"] in ("submitted", "processing")
        assert time.monotonic() < deadline, data
        time.sleep(0.05)
    assert data["task_status"] == "succeed", data
    video = data["task_result"]["videos"][0]
    assert float(video["duration"]) > 0
    return _download_mp4(video["url"])


class TestApiMdClient:
    def test_imarouter_text_and_image(self) -> None:
        """A plain httpx client following API.md §1 finishes text- and image-to-video tasks."""
        image = "data:image/png;base64," + png_b64()
        with SimulatorServer(FAST.replace(api_key="sk-apimd")) as server:
            text = _imarouter_run(server.base_url, "sk-apimd", {
                "model": "kling-v2-6", "prompt": "A lighthouse at dusk", "duration": 5,
                "size": "16:9", "metadata": {"mode": "std", "negative_prompt": "blurry"}})
            still = _imarouter_run(server.base_url, "sk-apimd", {
                "model": "kling-v2-1-master", "prompt": "Waves", "duration": "10",
                "size": "9:16", "image": image, "metadata": {"image_tail": image}})
            assert text != still

    def test_kling_text_and_image(self) -> None:
        """A plain httpx client following API.md §2 finishes text2video and image2video tasks."""
        raw = base64.b64encode(_jpeg()).decode()
        with SimulatorServer(FAST) as server:
            text = _kling_run(server.base_url, "text2video", {
                "model_name": "kling-v1-6", "prompt": "A fox", "duration": "5", "mode": "std",
                "aspect_ratio": "1:1", "cfg_scale": 0.5, "external_task_id": "apimd-1"})
            still = _kling_run(server.base_url, "image2video", {
                "model_name": "kling-v2-6", "prompt": "It turns", "duration": "5",
                "image": raw, "sound": "off"})
            assert text != still


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 360), (20, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()

