"""The Kling native shape (API.md §2): JWT auth, envelopes, validation, queries, error codes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sim_helpers import Sim, png_b64, sign

pytestmark = pytest.mark.timeout(30)

DONE = 10_000


class TestKlingAuth:
    async def _create(self, sim: Sim, authorization: str | None) -> httpx.Response:
        headers = {} if authorization is None else {"Authorization": authorization}
        return await sim.client.post("/v1/videos/text2video", headers=headers,
                                     json={"prompt": "p", "duration": "5"})

    @pytest.mark.parametrize(
        ("authorization", "code"),
        [
            (None, 1001),
            ("Bearer ", 1001),
            ("Bearer not.a.jwt", 1002),
            ("Bearer " + sign(secret="other-secret"), 1002),
            ("Bearer " + sign(access="someone-else"), 1002),
            ("Bearer " + sign(nbf_ago=-600), 1003),
            ("Bearer " + sign(exp_in=-10), 1004),
        ],
    )
    async def test_codes(self, authorization: str | None, code: int) -> None:
        """Missing → 1001, bad signature or issuer → 1002, nbf ahead → 1003, expired → 1004."""
        async with Sim() as sim:
            r = await self._create(sim, authorization)
            assert r.status_code == 401
            body = r.json()
            assert body["code"] == code and body["data"] is None and body["request_id"]
            assert (await sim.stats())["creates"] == 0

    async def test_clock_expires_tokens(self) -> None:
        """A token valid now answers 1004 once the simulator's clock passes its exp."""
        async with Sim() as sim:
            token = sim.token(exp_in=1800)
            assert (await sim.kling_create(token=token)).json()["code"] == 0
            sim.advance(1801)
            assert (await sim.kling_get("x", token=token)).json()["code"] == 1004

    async def test_configured_keys(self) -> None:
        """Tokens must use the configured access/secret keys; an api_key bearer also works."""
        async with Sim(access_key="ak", secret_key="sk-secret", api_key="single-key") as sim:
            good = sim.token(access="ak", secret="sk-secret")
            assert (await sim.kling_create(token=good)).status_code == 200
            assert (await sim.kling_create(token=sim.token())).json()["code"] == 1002
            assert (await sim.kling_create(token="single-key")).status_code == 200


class TestKlingCreate:
    async def test_envelope(self) -> None:
        """A create answers {code: 0, message, request_id, data: {task_id, task_status, …}}."""
        async with Sim() as sim:
            r = await sim.kling_create(external_task_id="job-1",
                                       callback_url="http://127.0.0.1:9/x")
            body = r.json()
            assert r.status_code == 200 and body["code"] == 0 and body["request_id"]
            data = body["data"]
            assert data["task_status"] == "submitted" and data["task_id"].isdigit()
            assert data["task_info"] == {"external_task_id": "job-1"}
            assert data["created_at"] > 10**12 and data["updated_at"] == data["created_at"]

    @pytest.mark.parametrize(
        ("kind", "change", "code", "status", "words"),
        [
            ("text2video", {"duration": 5}, 1201, 400, "string"),
            ("text2video", {"duration": "7"}, 1201, 400, "duration"),
            ("text2video", {"model_name": "kling-v9"}, 1203, 404, "does not exist"),
            ("text2video", {"cfg_scale": 0.5}, 1201, 400, "cfg_scale"),
            ("text2video", {"model_name": "kling-v1-6", "cfg_scale": 2}, 1201, 400, "cfg_scale"),
            ("text2video", {"negative_prompt": "n" * 2501}, 1201, 400, "negative_prompt"),
            ("text2video", {"prompt": "x" * 2501}, 1201, 400, "2500"),
            ("text2video", {"prompt": ""}, 1201, 400, "prompt"),
            ("text2video", {"aspect_ratio": "4:3"}, 1201, 400, "aspect_ratio"),
            ("text2video", {"mode": "max"}, 1201, 400, "mode"),
            ("text2video", {"model_name": "kling-v1", "sound": "on"}, 1201, 400, "sound"),
            ("image2video", {}, 1201, 400, "image"),
            ("image2video", {"image": "data:image/png;base64,AAAA"}, 1201, 400, "data:"),
            ("image2video", {"image": "https://e.com/a.png", "image_tail": "https://e.com/b.png",
                             "camera_control": {"type": "simple"}}, 1201, 400, "camera_control"),
            ("image2video", {"image": png_b64(100, 100)}, 1201, 400, "300 px"),
        ],
    )
    async def test_invalid(self, kind: str, change: dict[str, Any], code: int, status: int,
                           words: str) -> None:
        """Bad parameters answer 1201 (HTTP 400), an unknown model 1203 (HTTP 404)."""
        async with Sim() as sim:
            r = await sim.kling_create(kind, **change)
            assert (r.status_code, r.json()["code"]) == (status, code)
            assert words in r.json()["message"]
            assert (await sim.stats())["creates"] == 0

    async def test_body_not_json(self) -> None:
        """A body that is not JSON answers 1200."""
        async with Sim() as sim:
            r = await sim.client.post("/v1/videos/text2video", content=b"[",
                                      headers={"Authorization": f"Bearer {sim.token()}"})
            assert (r.status_code, r.json()["code"]) == (400, 1200)

    async def test_valid_variants(self) -> None:
        """cfg_scale on v1.x, raw base64 and URL images, first-last frames, sound on v2.6."""
        async with Sim() as sim:
            ok = [
                await sim.kling_create(model_name="kling-v1-6", cfg_scale=0.5, mode="pro"),
                await sim.kling_create(sound="on", duration="10", aspect_ratio="1:1"),
                await sim.kling_create("image2video", image=png_b64(), prompt=""),
                await sim.kling_create("image2video", image="https://example.com/a.jpg",
                                       image_tail=png_b64(fmt="JPEG")),
            ]
            assert [r.json()["code"] for r in ok] == [0, 0, 0, 0]

    async def test_content_policy(self) -> None:
        """A prompt with the word "forbidden" answers 1301 (HTTP 400)."""
        async with Sim() as sim:
            r = await sim.kling_create(prompt="Forbidden fruit")
            assert (r.status_code, r.json()["code"]) == (400, 1301)

    async def test_duplicate_external_task_id(self) -> None:
        """A second create with the same external_task_id is refused and creates nothing."""
        async with Sim() as sim:
            assert (await sim.kling_create(external_task_id="e1")).json()["code"] == 0
            r = await sim.kling_create(external_task_id="e1")
            assert (r.status_code, r.json()["code"]) == (400, 1201)
            assert "duplicated" in r.json()["message"]
            stats = await sim.stats()
            assert stats["creates"] == 1 and stats["creates_by_key"] == {"e1": 1}
            assert stats["create_requests_by_key"] == {"e1": 2}
            assert stats["rejected"] == {"duplicate_external_id": 1}


class TestKlingQuery:
    async def test_lifecycle(self) -> None:
        """submitted → processing → succeed with videos[].{id,url,duration:"5.042"} and units."""
        async with Sim(render_median_s=100, render_sigma=0) as sim:
            tid = (await sim.kling_create(mode="pro")).json()["data"]["task_id"]
            assert (await sim.kling_get(tid)).json()["data"]["task_status"] == "submitted"
            sim.advance(50)
            processing = (await sim.kling_get(tid)).json()["data"]
            assert processing["task_status"] == "processing"
            assert processing["updated_at"] > processing["created_at"]
            sim.advance(DONE)
            data = (await sim.kling_get(tid)).json()["data"]
            assert data["task_status"] == "succeed" and data["task_status_msg"] == ""
            video = data["task_result"]["videos"][0]
            assert video["duration"] == "5.042" and video["id"]
            assert float(data["final_unit_deduction"]) > 0
            r = await sim.client.get(video["url"])
            assert r.status_code == 200 and r.content[4:8] == b"ftyp"

    async def test_by_external_task_id(self) -> None:
        """A task can be queried by its external_task_id."""
        async with Sim() as sim:
            tid = (await sim.kling_create("image2video", image=png_b64(),
                                          external_task_id="run-job-1")).json()["data"]["task_id"]
            data = (await sim.kling_get("run-job-1", kind="image2video")).json()["data"]
            assert data["task_id"] == tid
            assert data["task_info"]["external_task_id"] == "run-job-1"

    async def test_not_found_and_wrong_kind(self) -> None:
        """Unknown ids, and ids asked for under the other kind, answer HTTP 404."""
        async with Sim() as sim:
            tid = (await sim.kling_create()).json()["data"]["task_id"]
            assert (await sim.kling_get("123")).status_code == 404
            assert (await sim.kling_get(tid, kind="image2video")).status_code == 404

    async def test_failed_task(self) -> None:
        """A failed task reports task_status failed with task_status_msg and no deduction."""
        async with Sim(fail_rate=1.0, fail_reasons=("content_policy",)) as sim:
            tid = (await sim.kling_create()).json()["data"]["task_id"]
            sim.advance(DONE)
            data = (await sim.kling_get(tid)).json()["data"]
            assert data["task_status"] == "failed" and "risk control" in data["task_status_msg"]
            assert data["final_unit_deduction"] == "0"

    async def test_list(self) -> None:
        """The list endpoint pages a kind's tasks newest first; ranges are checked."""
        async with Sim() as sim:
            ids = [(await sim.kling_create()).json()["data"]["task_id"] for _ in range(5)]
            await sim.kling_create("image2video", image=png_b64())
            auth = {"Authorization": f"Bearer {sim.token()}"}
            r = await sim.client.get("/v1/videos/text2video?pageNum=1&pageSize=2", headers=auth)
            assert [t["task_id"] for t in r.json()["data"]] == ids[::-1][:2]
            r = await sim.client.get("/v1/videos/text2video?pageNum=3&pageSize=2", headers=auth)
            assert [t["task_id"] for t in r.json()["data"]] == ids[:1]
            for query in ("pageSize=501", "pageNum=0", "pageNum=1001", "pageSize=x"):
                bad = await sim.client.get(f"/v1/videos/text2video?{query}", headers=auth)
                assert (bad.status_code, bad.json()["code"]) == (400, 1201)


class TestKlingAccountErrors:
    async def test_rate_limit_1302(self) -> None:
        """Over rate_limit_per_s answers 1302 (HTTP 429) with Retry-After."""
        async with Sim(rate_limit_per_s=1, retry_after_s=2) as sim:
            assert (await sim.kling_create()).status_code == 200
            r = await sim.kling_create()
            assert (r.status_code, r.json()["code"]) == (429, 1302)
            assert r.headers["Retry-After"] == "2"

    async def test_slots_1303(self) -> None:
        """Past slot_limit a create answers 1303 (HTTP 429)."""
        async with Sim(slot_limit=1) as sim:
            await sim.kling_create()
            r = await sim.kling_create()
            assert (r.status_code, r.json()["code"]) == (429, 1303)

    async def test_credits_1102(self) -> None:
        """After credits_after_creates tasks, creates answer 1102 (HTTP 429)."""
        async with Sim(credits_after_creates=1) as sim:
            await sim.kling_create()
            r = await sim.kling_create()
            assert (r.status_code, r.json()["code"]) == (429, 1102)

    async def test_server_errors(self) -> None:
        """Create and poll faults answer 5000 (HTTP 500) or 5001 (HTTP 503)."""
        async with Sim(create_5xx_rate=1.0, poll_5xx_rate=1.0) as sim:
            seen = set()
            for _ in range(12):
                r = await sim.kling_create()
                seen.add((r.status_code, r.json()["code"]))
            assert seen == {(500, 5000), (503, 5001)}
            sim.state.update_config(create_5xx_rate=0)
            tid = (await sim.kling_create()).json()["data"]["task_id"]
            r = await sim.kling_get(tid)
            assert (r.status_code, r.json()["code"]) in {(500, 5000), (503, 5001)}

    async def test_5xx_after_create_and_drop(self) -> None:
        """A 5xx after create leaves a task findable by external_task_id; drops break polls."""
        async with Sim(create_5xx_after_create_rate=1.0, poll_drop_rate=1.0) as sim:
            r = await sim.kling_create(external_task_id="amb-1")
            assert r.status_code in (500, 503)
            with pytest.raises(httpx.RemoteProtocolError):
                await sim.kling_get("amb-1")
            sim.state.update_config(poll_drop_rate=0)
            assert (await sim.kling_get("amb-1")).json()["code"] == 0
