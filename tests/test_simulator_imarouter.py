"""The ImaRouter shape (API.md §1): create, poll, content, errors, idempotency, quirks, faults."""

from __future__ import annotations

import itertools
import time
from typing import Any

import httpx
import pytest
from sim_helpers import IMA_AUTH, Sim, has_ftyp, png_b64

from batchkling.simulator.config import config_from_mapping

pytestmark = pytest.mark.timeout(30)

DONE = 10_000  # sim seconds after which every finite task has ended


class TestImaRouterCreate:
    async def test_answers_a_queued_video_object(self) -> None:
        """A create answers {id, task_id, object: video, model, status: queued, progress: 0}."""
        async with Sim() as sim:
            r = await sim.ima_create(model="kling-v1-6", duration="10", size="9:16",
                                     metadata={"mode": "pro"})
            assert r.status_code == 200
            body = r.json()
            assert body["id"] == body["task_id"] and body["task_id"].startswith("video_")
            assert body["object"] == "video" and body["model"] == "kling-v1-6"
            assert body["status"] == "queued" and body["progress"] == 0
            assert abs(body["created_at"] - time.time()) < 60

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"model": "kling-v9"}, "model"),
            ({"duration": 7}, "duration"),
            ({"duration": "five"}, "duration"),
            ({"size": "4:3"}, "size"),
            ({"prompt": "x" * 2501}, "prompt"),
            ({"prompt": "   "}, "prompt"),
            ({"metadata": {"mode": "ultra"}}, "metadata.mode"),
            ({"metadata": {"image_tail": "https://example.com/b.jpg"}}, "metadata.image_tail"),
            ({"metadata": {"negative_prompt": "n" * 2501}}, "metadata.negative_prompt"),
            ({"model": "kling-v2-master", "metadata": {"cfg_scale": 0.5}}, "cfg_scale"),
            ({"image": "not base64 at all!"}, "image"),
            ({"metadata": "pro"}, "metadata"),
        ],
    )
    async def test_invalid_requests_name_the_field(self, change: dict[str, Any],
                                                   field: str) -> None:
        """A bad field answers 400 invalid_request whose message names the field."""
        async with Sim() as sim:
            r = await sim.ima_create(**change)
            assert r.status_code == 400
            body = r.json()
            assert body["code"] == "invalid_request" and body["data"] is None
            assert field in body["message"]
            assert (await sim.stats())["creates"] == 0

    async def test_message_lists_allowed_values(self) -> None:
        """The message for a bad choice lists the allowed values."""
        async with Sim() as sim:
            message = (await sim.ima_create(size="4:3")).json()["message"]
            assert "1:1, 16:9, 9:16" in message

    async def test_image_forms(self) -> None:
        """image may be a URL, a data URI or raw base64; image-only needs no prompt."""
        async with Sim() as sim:
            for image in ("https://example.com/first.jpg", png_b64(),
                          "data:image/png;base64," + png_b64(),
                          "data:image/jpeg;base64," + png_b64(fmt="JPEG")):
                r = await sim.ima_create(image=image, prompt="",
                                         metadata={"image_tail": png_b64()})
                assert r.status_code == 200, r.text
            assert (await sim.client.get("/_sim/tasks")).json()[0]["kind"] == "image2video"

    async def test_image_rules(self) -> None:
        """Images under 300 px or outside 1:2.5..2.5:1 are refused unless validation is off."""
        async with Sim() as sim:
            small = await sim.ima_create(image=png_b64(200, 200))
            assert small.status_code == 400 and "300 px" in small.json()["message"]
            wide = await sim.ima_create(image=png_b64(1200, 300))
            assert wide.status_code == 400 and "aspect" in wide.json()["message"]
            sim.state.update_config(validate_images=False)
            assert (await sim.ima_create(image=png_b64(200, 200))).status_code == 200

    async def test_bad_json(self) -> None:
        """A body that is not JSON answers 400 invalid_request."""
        async with Sim() as sim:
            r = await sim.client.post("/v1/videos", content=b"{", headers=IMA_AUTH)
            assert r.status_code == 400 and r.json()["code"] == "invalid_request"

    async def test_content_policy_at_create(self) -> None:
        """A prompt with the word "forbidden" is refused with content_policy_violation."""
        async with Sim() as sim:
            r = await sim.ima_create(prompt="a forbidden scene")
            assert r.status_code == 400 and r.json()["code"] == "content_policy_violation"
            assert (await sim.stats())["rejected"] == {"content_policy": 1}

    async def test_legacy_endpoint(self) -> None:
        """The legacy /v1/video/generations pair takes the same body."""
        async with Sim() as sim:
            r = await sim.client.post("/v1/video/generations", headers=IMA_AUTH,
                                      json={"model": "kling-v1", "prompt": "p"})
            r2 = await sim.client.get(f"/v1/video/generations/{r.json()['task_id']}",
                                      headers=IMA_AUTH)
            assert r2.status_code == 200


class TestImaRouterAuth:
    async def test_missing_bearer(self) -> None:
        """No Authorization answers 401 invalid_api_key saying the header is missing."""
        async with Sim() as sim:
            r = await sim.ima_create(headers={})
            assert r.status_code == 401
            assert r.json()["code"] == "invalid_api_key" and "missing" in r.json()["message"]
            assert (await sim.ima_get("video_x", headers={"Authorization": "Bearer "})
                    ).status_code == 401

    async def test_wrong_key(self) -> None:
        """With api_key set, another bearer answers 401; the right one is accepted."""
        async with Sim(api_key="sk-right") as sim:
            r = await sim.ima_create(headers={"Authorization": "Bearer sk-wrong"})
            assert r.status_code == 401 and "not valid" in r.json()["message"]
            ok = await sim.ima_create(headers={"Authorization": "Bearer sk-right"})
            assert ok.status_code == 200
            assert (await sim.stats())["rejected"] == {"auth": 1}


class TestImaRouterLifecycle:
    async def test_queued_in_progress_completed(self) -> None:
        """A task goes queued → in_progress (progress climbing) → completed with a result."""
        async with Sim(queue_s=2, render_median_s=100, render_sigma=0) as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            assert (await sim.ima_get(tid)).json()["status"] == "queued"
            sim.advance(50)
            mid = (await sim.ima_get(tid)).json()
            assert mid["status"] == "in_progress" and 30 < mid["progress"] < 70
            assert mid["completed_at"] is None and "url" not in mid["metadata"]
            sim.advance(60)
            done = (await sim.ima_get(tid)).json()
            assert done["status"] == "completed" and done["progress"] == 100
            assert done["completed_at"] - done["created_at"] in (101, 102, 103)
            assert done["amount_usd"] > 0
            result = done["results"][0]
            assert result["url"] == done["metadata"]["url"]
            assert result["url"].startswith("http://testserver/_sim/files/")
            assert (result["width"], result["height"], result["content_type"]) == (
                1280, 720, "video/mp4")
            video = await sim.client.get(result["url"])
            assert video.status_code == 200 and len(video.content) == result["size"]

    async def test_content_endpoint(self) -> None:
        """GET /v1/videos/{id}/content returns the MP4 once completed, 400 before."""
        async with Sim() as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            early = await sim.client.get(f"/v1/videos/{tid}/content", headers=IMA_AUTH)
            assert early.status_code == 400
            sim.advance(DONE)
            r = await sim.client.get(f"/v1/videos/{tid}/content", headers=IMA_AUTH)
            assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
            assert has_ftyp(r.content)

    async def test_unknown_task(self) -> None:
        """An unknown id answers 404 task_not_found."""
        async with Sim() as sim:
            r = await sim.ima_get("video_nope")
            assert r.status_code == 404 and r.json()["code"] == "task_not_found"


class TestImaRouterIdempotency:
    async def test_same_key_same_task(self) -> None:
        """A repeated Idempotency-Key answers the first task; only one task is created."""
        async with Sim() as sim:
            headers = {**IMA_AUTH, "Idempotency-Key": "run1-job1-1"}
            first = (await sim.ima_create(headers=headers)).json()["task_id"]
            again = (await sim.ima_create(headers=headers)).json()["task_id"]
            assert first == again
            stats = await sim.stats()
            assert stats["creates_by_key"] == {"run1-job1-1": 1}
            assert stats["create_requests_by_key"] == {"run1-job1-1": 2}
            assert stats["replays"] == 1 and stats["duplicate_keys"] == []

    async def test_external_task_id_is_a_key(self) -> None:
        """metadata.external_task_id deduplicates creates like the header does."""
        async with Sim() as sim:
            meta = {"external_task_id": "ext-1"}
            a = (await sim.ima_create(metadata=meta)).json()["task_id"]
            b = (await sim.ima_create(metadata=meta)).json()["task_id"]
            assert a == b and (await sim.stats())["creates_by_key"] == {"ext-1": 1}

    async def test_not_honoured(self) -> None:
        """With honor_idempotency_key off, a retry makes a second paid task (and stats show it)."""
        async with Sim(honor_idempotency_key=False) as sim:
            headers = {**IMA_AUTH, "Idempotency-Key": "k"}
            a = (await sim.ima_create(headers=headers)).json()["task_id"]
            b = (await sim.ima_create(headers=headers)).json()["task_id"]
            stats = await sim.stats()
            assert a != b and stats["creates_by_key"] == {"k": 2}
            assert stats["duplicate_keys"] == ["k"]

    async def test_without_key_counted(self) -> None:
        """Creates without a key are counted apart."""
        async with Sim() as sim:
            await sim.ima_create()
            assert (await sim.stats())["creates_without_key"] == 1


class TestImaRouterQuirks:
    async def test_status_synonyms(self) -> None:
        """With synonyms on, statuses come from the documented synonym sets."""
        async with Sim(quirk_status_synonyms=True, fail_rate=0.5) as sim:
            ids = [(await sim.ima_create()).json()["task_id"] for _ in range(12)]
            seen = {(await sim.ima_get(t)).json()["status"] for t in ids}
            sim.advance(DONE)
            seen |= {(await sim.ima_get(t)).json()["status"] for t in ids}
            allowed = {"queued", "pending", "submitted", "NOT_START", "completed", "succeeded",
                       "succeed", "success", "failed", "error", "canceled", "cancelled"}
            assert seen <= allowed and len(seen) > 3

    async def test_wrapped_string_progress_ms_timestamps(self) -> None:
        """Wrapped bodies {code: 0, data}, "42%" progress and millisecond timestamps."""
        async with Sim(quirk_wrapped=True, quirk_progress_string=True,
                       quirk_ms_timestamps=True) as sim:
            created = (await sim.ima_create()).json()
            assert created["code"] == 0 and created["data"]["progress"] == "0%"
            tid = created["data"]["task_id"]
            sim.advance(DONE)
            data = (await sim.ima_get(tid)).json()["data"]
            assert data["progress"] == "100%"
            assert data["created_at"] > 10**12 and data["completed_at"] > data["created_at"]

    async def test_completed_without_url_first(self) -> None:
        """The first completed poll has no URL; the next one has it."""
        async with Sim(quirk_completed_without_url=True) as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            sim.advance(DONE)
            first = (await sim.ima_get(tid)).json()
            assert first["status"] == "completed" and "url" not in first["metadata"]
            assert "results" not in first
            assert (await sim.ima_get(tid)).json()["metadata"]["url"]

    async def test_404_right_after_create(self) -> None:
        """Polls answer 404 task_not_found for quirk_404_after_create_s after create."""
        async with Sim(quirk_404_after_create_s=3) as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            assert (await sim.ima_get(tid)).status_code == 404
            sim.advance(3.5)
            assert (await sim.ima_get(tid)).status_code == 200

    async def test_fail_reason_fields(self) -> None:
        """Failed tasks put the reason in error.message, fail_reason or task_status_msg."""
        async with Sim(quirk_fail_reason_fields=True, fail_rate=1.0) as sim:
            ids = [(await sim.ima_create()).json()["task_id"] for _ in range(9)]
            sim.advance(DONE)
            places = set()
            for tid in ids:
                body = (await sim.ima_get(tid)).json()
                for key in ("error", "fail_reason", "task_status_msg"):
                    if key in body:
                        places.add(key)
            assert places == {"error", "fail_reason", "task_status_msg"}

    async def test_poll_after_hint(self) -> None:
        """poll_after_s sends openai-poll-after-ms (scaled by speed) while a task runs."""
        async with Sim(poll_after_s=15, speed=10) as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            assert (await sim.ima_get(tid)).headers["openai-poll-after-ms"] == "1500"

    async def test_status_refresh_shows_the_gateways_last_look(self) -> None:
        """With status_refresh_s, a poll shows the task as at the gateway's last look (one loop
        for all tasks, 15 s apart): progress moves only on looks, the same looks for every
        task; the end is read first at the look after it, which is also the ``completed_at``
        the gateway reports, and when the simulator notes it seen."""
        async with Sim(status_refresh_s=15, queue_s=0, render_sigma=0, render_median_s=100,
                       quirk_ms_timestamps=True) as sim:
            tids = [(await sim.ima_create()).json()["task_id"]]
            sim.advance(4.0)
            tids.append((await sim.ima_create()).json()["task_id"])
            tasks = [sim.state.tasks[tid] for tid in tids]
            shown: dict[str, list[tuple[float, int, str, Any]]] = {tid: [] for tid in tids}
            step = 0.5
            for _ in range(int(160 / step)):
                sim.advance(step)
                for tid in tids:
                    body = (await sim.ima_get(tid)).json()
                    shown[tid].append((sim.state.sim_now(), body["progress"], body["status"],
                                       body["completed_at"]))
            changes = {tid: {t for (_, p, _, _), (t, q, _, _) in itertools.pairwise(rows)
                             if q != p} for tid, rows in shown.items()}
            assert len(changes[tids[0]]) >= 6
            # Between looks nothing moves, and the looks are the same for both tasks.
            for t in changes[tids[0]] | changes[tids[1]]:
                assert sim.state.looked(t) > t - step, t
            assert len(changes[tids[0]] & changes[tids[1]]) >= 5
            looks = sorted(changes[tids[0]])
            assert all(b - a == pytest.approx(15 * round((b - a) / 15), abs=step)
                       for a, b in itertools.pairwise(looks))
            for task in tasks:
                rows = shown[task.task_id]
                done_at = min(t for t, _, status, _ in rows if status == "completed")
                assert task.ends_sim < done_at <= task.ends_sim + 15 + step
                assert all(status != "completed" for t, _, status, _ in rows
                           if t < task.ends_sim)
                # completed_at is the look that saw the end, not the end itself.
                look = sim.state.gateway_saw(task.ends_sim)
                assert task.ends_sim < look <= done_at
                reported = next(c for _, _, status, c in rows if status == "completed")
                assert reported == int(sim.state.sim_to_wall(look) * 1000)
                assert task.seen_done_sim == pytest.approx(done_at)
        async with Sim(status_refresh_s=0, queue_s=0, render_sigma=0,
                       render_median_s=100) as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            sim.advance(50.25)
            assert (await sim.ima_get(tid)).json()["progress"] == 50  # fresh without a refresh

    async def test_status_refresh_jitter_drifts_the_looks(self) -> None:
        """status_refresh_jitter_s makes each loop up to that much longer: the looks are 15 to
        18 s apart and irregular, the same whatever order they are asked in, and an end is
        still dated by the look that saw it."""
        settings = {"status_refresh_s": 15, "status_refresh_jitter_s": 3, "queue_s": 0,
                    "render_sigma": 0, "render_median_s": 100, "quirk_ms_timestamps": True}
        async with Sim(**settings) as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            task = sim.state.tasks[tid]
            looks = sorted({sim.state.looked(t / 4) for t in range(4 * 400)})
            gaps = [b - a for a, b in itertools.pairwise(looks)]
            assert all(15 <= g <= 18 for g in gaps)
            assert max(gaps) - min(gaps) > 1.5  # irregular, not a fixed period
            assert sim.state.gateway_saw(looks[5]) == looks[5]
            assert sim.state.gateway_saw(looks[5] + 0.01) == looks[6]
            sim.advance(task.ends_sim - sim.state.sim_now() + 20)
            body = (await sim.ima_get(tid)).json()
            assert body["status"] == "completed"
            look = sim.state.gateway_saw(task.ends_sim)
            assert look in looks and task.ends_sim <= look < task.ends_sim + 18
            assert body["completed_at"] == int(sim.state.sim_to_wall(look) * 1000)
        async with Sim(**settings) as sim:  # asked backwards: the same looks
            later = sim.state.gateway_saw(300.0)
            assert sorted({sim.state.looked(t / 4) for t in range(4 * 400)}) == looks
            assert later in looks
        with pytest.raises(ValueError, match="status_refresh_jitter_s needs status_refresh_s"):
            config_from_mapping({"status_refresh_jitter_s": 3})

    async def test_a_gateway_that_does_not_lag_looks_now(self) -> None:
        """Without status_refresh_s the gateway shows each task as it is: its latest look is
        the moment asked about (and asking does not loop forever drawing looks)."""
        async with Sim() as sim:
            assert sim.state.looked(123.5) == 123.5
            assert sim.state.gateway_saw(42.0) == 42.0


class TestImaRouterFaults:
    async def test_create_5xx_creates_nothing(self) -> None:
        """create_5xx_rate answers 500/503 upstream_error and creates no task."""
        async with Sim(create_5xx_rate=1.0) as sim:
            r = await sim.ima_create()
            assert r.status_code in (500, 503) and r.json()["code"] == "upstream_error"
            assert (await sim.stats())["creates"] == 0

    async def test_create_5xx_after_create(self) -> None:
        """create_5xx_after_create_rate answers 5xx although the task exists (ambiguous)."""
        async with Sim(create_5xx_after_create_rate=1.0) as sim:
            headers = {**IMA_AUTH, "Idempotency-Key": "amb"}
            r = await sim.ima_create(headers=headers)
            assert r.status_code in (500, 503)
            stats = await sim.stats()
            assert stats["creates"] == 1 and stats["creates_by_key"] == {"amb": 1}
            sim.state.update_config(create_5xx_after_create_rate=0)
            replay = await sim.ima_create(headers=headers)
            assert replay.json()["task_id"] == sim.state.task_table()[0]["task_id"]

    async def test_hang_after_create(self) -> None:
        """create_hang_after_create_rate holds the answer hang_s real seconds; the task exists."""
        async with Sim(create_hang_after_create_rate=1.0, hang_s=0.3) as sim:
            t0 = time.monotonic()
            r = await sim.ima_create()
            assert r.status_code == 200 and time.monotonic() - t0 >= 0.3
            assert (await sim.stats())["rejected"]["hung_after_create"] == 1

    async def test_poll_5xx(self) -> None:
        """poll_5xx_rate answers 500/503 upstream_error on polls."""
        async with Sim(poll_5xx_rate=1.0) as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            r = await sim.ima_get(tid)
            assert r.status_code in (500, 503) and r.json()["code"] == "upstream_error"

    async def test_poll_drop_is_a_transport_error(self) -> None:
        """poll_drop_rate breaks the answer off: the client sees a transport error."""
        async with Sim(poll_drop_rate=1.0) as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            with pytest.raises(httpx.RemoteProtocolError):
                await sim.ima_get(tid)
            assert (await sim.stats())["rejected"]["dropped"] == 1

    async def test_failed_tasks(self) -> None:
        """Failed tasks carry error.code: content_policy_violation (not retryable) or upstream."""
        async with Sim(fail_rate=1.0) as sim:
            ids = [(await sim.ima_create()).json()["task_id"] for _ in range(10)]
            sim.advance(DONE)
            bodies = [(await sim.ima_get(t)).json() for t in ids]
            assert {b["status"] for b in bodies} == {"failed"}
            codes = {b["error"]["code"] for b in bodies}
            assert codes == {"content_policy_violation", "upstream_error"}
            assert all(b["amount_usd"] == 0 and b["error"]["message"] for b in bodies)
            policy = next(b for b in bodies if b["error"]["code"] == "content_policy_violation")
            assert "not retryable" in policy["error"]["message"]

    async def test_never_finish(self) -> None:
        """never_finish_rate tasks stay in_progress forever and keep their slot."""
        async with Sim(never_finish_rate=1.0) as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            sim.advance(10 * DONE)
            body = (await sim.ima_get(tid)).json()
            assert body["status"] == "in_progress" and body["progress"] < 100
            assert (await sim.stats())["slots_in_use"] == 1

    async def test_prompt_tags_force_outcomes(self) -> None:
        """[sim:fail=…], [sim:never] and [sim:render=N] in a prompt force that task's fate."""
        async with Sim() as sim:
            fail = (await sim.ima_create(prompt="x [sim:fail=content_policy]")).json()["id"]
            never = (await sim.ima_create(prompt="x [sim:never]")).json()["id"]
            quick = (await sim.ima_create(prompt="x [sim:render=1]")).json()["id"]
            sim.advance(5)
            assert (await sim.ima_get(quick)).json()["status"] == "completed"
            sim.advance(DONE)
            assert (await sim.ima_get(fail)).json()["error"]["code"] == "content_policy_violation"
            assert (await sim.ima_get(never)).json()["status"] == "in_progress"

    async def test_slow_response(self) -> None:
        """slow_response_s delays every API answer by that many real seconds."""
        async with Sim(slow_response_s=0.2) as sim:
            t0 = time.monotonic()
            await sim.ima_create()
            assert time.monotonic() - t0 >= 0.2
            t0 = time.monotonic()
            await sim.stats()
            assert time.monotonic() - t0 < 0.2
