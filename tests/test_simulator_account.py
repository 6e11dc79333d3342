"""The shared account (slots, rate, credit), the introspection endpoints and the result files."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from sim_helpers import IMA_AUTH, Sim, has_ftyp

from batchkling.errors import ConfigError
from batchkling.simulator.media import base_clip

pytestmark = pytest.mark.timeout(30)

DONE = 10_000


class TestSlots:
    async def test_shared_between_shapes(self) -> None:
        """Both shapes share one slot pool; past the limit ImaRouter answers 429 with the reason."""
        async with Sim(slot_limit=2) as sim:
            assert (await sim.ima_create()).status_code == 200
            assert (await sim.kling_create()).status_code == 200
            r = await sim.ima_create()
            assert r.status_code == 429 and r.json()["code"] == "concurrency_limit_exceeded"
            assert "parallel task limit" in r.json()["message"]
            assert (await sim.kling_create()).json()["code"] == 1303
            stats = await sim.stats()
            assert stats["slots_in_use"] == 2 and stats["peak_slots"] == 2
            assert stats["slot_limit"] == 2 and stats["rejected"] == {"slots": 2}

    async def test_released_when_tasks_end(self) -> None:
        """A slot frees when its task ends, failed tasks included (and only then)."""
        async with Sim(slot_limit=1, fail_rate=1.0, render_median_s=100, render_sigma=0) as sim:
            await sim.ima_create()
            sim.advance(10)
            assert (await sim.ima_create()).status_code == 429
            sim.advance(DONE)
            assert (await sim.ima_create()).status_code == 200
            assert (await sim.stats())["slots_in_use"] == 1

    async def test_never_finishing_task_holds_its_slot(self) -> None:
        """A task that never finishes keeps its slot forever."""
        async with Sim(slot_limit=1, never_finish_rate=1.0) as sim:
            await sim.ima_create()
            sim.advance(100 * DONE)
            assert (await sim.ima_create()).status_code == 429

    async def test_replay_needs_no_slot(self) -> None:
        """Replaying a known Idempotency-Key answers the task even when slots are full."""
        async with Sim(slot_limit=1) as sim:
            headers = {**IMA_AUTH, "Idempotency-Key": "k1"}
            tid = (await sim.ima_create(headers=headers)).json()["task_id"]
            assert (await sim.ima_create(headers=headers)).json()["task_id"] == tid


class TestRateLimit:
    async def test_token_bucket_with_retry_after(self) -> None:
        """Creates over rate_limit_per_s answer 429 rate_limit_exceeded with Retry-After."""
        async with Sim(rate_limit_per_s=2, retry_after_s=0.5) as sim:
            assert [(await sim.ima_create()).status_code for _ in range(3)] == [200, 200, 429]
            r = await sim.ima_create()
            assert r.json()["code"] == "rate_limit_exceeded"
            assert r.headers["Retry-After"] == "0.5"
            sim.advance(0.5)
            assert (await sim.ima_create()).status_code == 200
            assert (await sim.stats())["rejected"] == {"rate_limited": 2}

    async def test_real_seconds_whatever_the_speed(self) -> None:
        """The rate window is in real (clock) seconds, not scaled by speed."""
        async with Sim(rate_limit_per_s=1, speed=100) as sim:
            await sim.ima_create()
            sim.advance(0.5)
            assert (await sim.ima_create()).status_code == 429
            sim.advance(0.5)
            assert (await sim.ima_create()).status_code == 200

    async def test_polls_not_limited(self) -> None:
        """Status queries are never rate limited."""
        async with Sim(rate_limit_per_s=1) as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            assert {(await sim.ima_get(tid)).status_code for _ in range(10)} == {200}


class TestCredits:
    async def test_out_of_credit_on_both_shapes(self) -> None:
        """After credits_after_creates tasks: ImaRouter 402 insufficient_quota, Kling 1102."""
        async with Sim(credits_after_creates=2) as sim:
            await sim.ima_create()
            await sim.kling_create()
            r = await sim.ima_create()
            assert r.status_code == 402 and r.json()["code"] == "insufficient_quota"
            assert (await sim.kling_create()).json()["code"] == 1102
            assert (await sim.stats())["rejected"] == {"credits": 2}


class TestIntrospection:
    async def test_stats_keys(self) -> None:
        """/_sim/stats has every documented key and counts polls, downloads and states."""
        async with Sim(render_median_s=100, render_sigma=0) as sim:
            tid = (await sim.ima_create()).json()["task_id"]
            await sim.ima_create()
            sim.advance(50)
            await sim.ima_create()
            sim.advance(60)
            url = (await sim.ima_get(tid)).json()["metadata"]["url"]
            await sim.client.get(url)
            stats = await sim.stats()
            for key in ("creates", "create_requests", "creates_by_key", "create_requests_by_key",
                        "creates_without_key", "tasks_by_state", "polls", "downloads",
                        "slots_in_use", "peak_slots", "slot_limit", "rejected", "callbacks_sent"):
                assert key in stats, key
            assert stats["tasks_by_state"] == {"queued": 0, "in_progress": 1, "completed": 2,
                                               "failed": 0}
            assert (stats["polls"], stats["downloads"], stats["slots_in_use"]) == (1, 1, 1)
            assert stats == sim.state.stats()

    async def test_tasks_table(self) -> None:
        """/_sim/tasks lists every task with key, shape, timings in sim seconds and status."""
        async with Sim(render_median_s=60, render_sigma=0, queue_s=2) as sim:
            await sim.ima_create(headers={**IMA_AUTH, "Idempotency-Key": "a"}, duration=10)
            sim.advance(7)
            await sim.kling_create(external_task_id="b", mode="pro")
            rows = (await sim.client.get("/_sim/tasks")).json()
            assert [(r["key"], r["shape"]) for r in rows] == [("a", "imarouter"), ("b", "kling")]
            first, second = rows
            assert first["render_seconds"] == pytest.approx(96)  # ×1.6 for 10 s
            assert second["render_seconds"] == pytest.approx(78)  # ×1.3 for pro
            assert second["created_at"] == pytest.approx(7)
            assert first["ends_at"] == pytest.approx(first["started_at"] + 96)
            assert {"task_id", "model", "duration", "mode", "status"} <= set(first)

    async def test_many_tasks_stay_cheap(self) -> None:
        """10,000 live tasks stay cheap: no per-task background work, slots freed lazily."""
        async with Sim() as sim:
            from batchkling.simulator.catalog import Spec

            spec = Spec("text2video", "kling-v2-6", 5, "16:9", "std", "p")
            tasks = [sim.state.create_task("imarouter", spec, key=None) for _ in range(10_000)]
            for t in tasks[::1000]:
                assert (await sim.ima_get(t.task_id)).status_code == 200
            sim.advance(DONE)
            assert sim.state.stats()["slots_in_use"] == 0


class TestResultFiles:
    async def _finished(self, sim: Sim, **body: Any) -> dict[str, Any]:
        tid = (await sim.ima_create(**body)).json()["task_id"]
        sim.advance(DONE)
        data: dict[str, Any] = (await sim.ima_get(tid)).json()
        return data

    async def test_distinct_valid_mp4s(self) -> None:
        """Every task's file is an MP4 (ftyp box first) with its own bytes; headers are right."""
        async with Sim() as sim:
            digests = set()
            for size in ("16:9", "9:16", "1:1", "16:9"):
                result = (await self._finished(sim, size=size))["results"][0]
                r = await sim.client.get(result["url"])
                assert r.headers["content-type"] == "video/mp4"
                assert int(r.headers["content-length"]) == len(r.content) == result["size"]
                assert has_ftyp(r.content) and r.content.startswith(base_clip(size))
                digests.add(hashlib.sha256(r.content).hexdigest())
            assert len(digests) == 4

    async def test_url_format(self) -> None:
        """Result URLs are {base}/_sim/files/{task_id}.mp4?exp=…&sig=… on the request's host."""
        async with Sim() as sim:
            body = await self._finished(sim)
            url = httpx.URL(body["metadata"]["url"])
            assert url.host == "testserver" and url.path == f"/_sim/files/{body['id']}.mp4"
            assert set(url.params) == {"exp", "sig"}

    async def test_expired_url_then_fresh_one(self) -> None:
        """After url_ttl_s a URL answers 403; a new poll gives a URL that works."""
        async with Sim(url_ttl_s=60) as sim:
            body = await self._finished(sim)
            url = body["metadata"]["url"]
            sim.advance(61)
            assert (await sim.client.get(url)).status_code == 403
            fresh = (await sim.ima_get(str(body["id"]))).json()["metadata"]["url"]
            assert fresh != url and (await sim.client.get(fresh)).status_code == 200
            assert (await sim.stats())["rejected"]["url_expired"] == 1

    async def test_forged_signature(self) -> None:
        """A URL whose signature or expiry was edited answers 403."""
        async with Sim(url_ttl_s=60) as sim:
            url = (await self._finished(sim))["metadata"]["url"]
            assert (await sim.client.get(url.replace("sig=", "sig=0"))).status_code == 403
            assert (await sim.client.get(url.replace("exp=", "exp=9"))).status_code == 403

    async def test_truncated_download(self) -> None:
        """download_truncate_rate sends fewer bytes than Content-Length: a transport error."""
        async with Sim(download_truncate_rate=1.0) as sim:
            url = (await self._finished(sim))["metadata"]["url"]
            with pytest.raises(httpx.RemoteProtocolError):
                await sim.client.get(url)

    def test_clips_ship_in_the_package(self) -> None:
        """The sample clips are package data, small, and real MP4s."""
        for size in ("16:9", "9:16", "1:1"):
            clip = base_clip(size)
            assert has_ftyp(clip) and len(clip) < 60_000 and b"avc1" in clip


SLOW: dict[str, Any] = {"render_median_s": 100, "render_sigma": 0, "slot_limit": 2}


class TestJournal:
    """Tasks kept in a file, so a simulator started again (``--simulate`` resume) has them."""

    async def test_same_seed_never_reuses_a_task_id(self) -> None:
        """Two simulators on one seed hand out different ids on both shapes: a restarted one
        must never give a client an id that already names another of its tasks."""
        async with Sim(seed=3) as a, Sim(seed=3) as b:
            assert (await a.ima_create()).json()["task_id"] != \
                (await b.ima_create()).json()["task_id"]
            assert (await a.kling_create()).json()["data"]["task_id"] != \
                (await b.kling_create()).json()["data"]["task_id"]

    async def test_tasks_outlive_a_restart(self, tmp_path: Path) -> None:
        """After a restart on the same journal, a task is found by id, by Idempotency-Key and
        by external_task_id, still holds its slot, and finishes and downloads as drawn."""
        journal = tmp_path / "tasks.jsonl"
        replay = {**IMA_AUTH, "Idempotency-Key": "k1"}
        async with Sim(journal=journal, **SLOW) as first:
            tid = (await first.ima_create(headers=replay)).json()["task_id"]
            kid = (await first.kling_create(external_task_id="bk-x")).json()["data"]["task_id"]
            drawn = {t["task_id"]: t["outcome"] for t in first.state.task_table()}
        async with Sim(journal=journal, **SLOW) as again:
            assert again.state.restored == 2
            assert (await again.ima_get(tid)).json()["status"] in ("queued", "in_progress")
            assert (await again.ima_create()).status_code == 429  # both slots still held
            assert (await again.ima_create(headers=replay)).json()["task_id"] == tid
            found = (await again.kling_get("bk-x")).json()["data"]
            assert found["task_id"] == kid and found["task_status"] in ("submitted", "processing")
            again.advance(DONE)
            done = (await again.ima_get(tid)).json()
            assert done["status"] == "completed" and drawn[tid] == "succeed"
            video = await again.client.get(done["metadata"]["url"])
            assert video.status_code == 200 and has_ftyp(video.content)
            stats = await again.stats()
            assert stats["creates"] == 0 and stats["slots_in_use"] == 0  # made by the first

    async def test_a_torn_last_line_is_skipped(self, tmp_path: Path) -> None:
        """A process killed mid-append leaves half a line: the tasks before it load."""
        journal = tmp_path / "tasks.jsonl"
        async with Sim(journal=journal) as first:
            await first.ima_create()
            await first.ima_create()
        journal.write_text(journal.read_text()[:-40])
        async with Sim(journal=journal) as again:
            assert again.state.restored == 1
            assert (await again.ima_create()).status_code == 200
        assert len(journal.read_text().splitlines()) == 3  # the torn line stays, unread
        async with Sim(journal=journal) as third:
            assert third.state.restored == 2

    def test_an_unreadable_journal_is_a_clear_error(self, tmp_path: Path) -> None:
        """Bytes that are not a journal stop the start with the file's name and the way out."""
        journal = tmp_path / "tasks.jsonl"
        journal.write_bytes(b"\xff\xfe garbage")
        with pytest.raises(ConfigError, match="delete it to start the simulated account afresh"):
            Sim(journal=journal)
