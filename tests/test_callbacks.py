"""Callbacks: the receiver is safe to expose, a hint is confirmed before it is believed, and a
run with callbacks polls far less than one without."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from conftest import SPEED, TEST_KEY

from batchkling.errors import ConfigError
from batchkling.manifest.document import load_manifest
from batchkling.providers.base import Phase, TaskStatus
from batchkling.providers.kling import KlingProvider
from batchkling.run.callbacks import (
    MAX_BODY,
    CallbackReceiver,
    callback_token,
    parse_listen,
    with_token,
)
from batchkling.run.orchestrator import Orchestrator
from batchkling.simulator import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, SimulatorServer
from batchkling.testing import write_manifest

pytestmark = pytest.mark.timeout(90)
ENV = {"BATCHKLING_TEST_KEY": TEST_KEY, "KLING_ACCESS_KEY": DEFAULT_ACCESS_KEY,
       "KLING_SECRET_KEY": DEFAULT_SECRET_KEY}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kling_task(task_id: str, status: str = "succeed") -> dict[str, Any]:
    return {"task_id": task_id, "task_status": status, "created_at": 1_700_000_000_000,
            "updated_at": 1_700_000_090_000,
            "task_result": {"videos": [{"id": "v", "url": "https://cdn.example/v.mp4"}]}}


class TestReceiver:
    async def _receiver(self, known: set[str]) -> tuple[CallbackReceiver, list[TaskStatus]]:
        got: list[TaskStatus] = []

        def on_status(status: TaskStatus) -> bool:
            if status.task_id not in known:
                return False
            got.append(status)
            return True

        provider = KlingProvider("http://127.0.0.1:9", api_key="sk-callback-test-000")
        receiver = CallbackReceiver("127.0.0.1", 0)
        receiver.route("t0ken", provider.parse_callback, on_status)
        await receiver.start()
        await provider.aclose()
        return receiver, got

    async def test_only_token_bearing_posts_of_known_tasks_count(self) -> None:
        """Without the token: 403 unread; with it, a known task's status is handed on, an
        unknown task's acknowledged and dropped, a body not JSON refused (400), any other
        method refused (405); the answer never repeats what was sent."""
        receiver, got = await self._receiver({"800001"})
        base = f"http://127.0.0.1:{receiver.port}/hook"
        try:
            async with httpx.AsyncClient() as client:
                forged = await client.post(f"{base}?bk=guess", json=_kling_task("800001"))
                assert forged.status_code == 403 and "800001" not in forged.text
                ok = await client.post(f"{base}?bk=t0ken", json=_kling_task("800001"))
                assert ok.status_code == 200 and ok.text == "ok\n"
                other = await client.post(f"{base}?bk=t0ken", json=_kling_task("800002"))
                assert other.status_code == 200 and other.text == "ok\n"
                enveloped = await client.post(f"{base}?bk=t0ken",
                                              json={"code": 0, "data": _kling_task("800001")})
                assert enveloped.status_code == 200
                bad = await client.post(f"{base}?bk=t0ken", content=b"{not json")
                assert bad.status_code == 400 and "not json" not in bad.text
                get = await client.get(f"{base}?bk=t0ken")
                assert get.status_code == 405
        finally:
            await receiver.stop()
        assert [(s.task_id, s.phase) for s in got] == [("800001", Phase.SUCCEEDED)] * 2
        assert receiver.received == 2 and receiver.refused == 3

    async def test_body_size_is_bounded(self) -> None:
        """A body over 64 KiB is refused (413), never parsed."""
        receiver, got = await self._receiver({"800001"})
        try:
            async with httpx.AsyncClient() as client:
                big = {**_kling_task("800001"), "pad": "x" * MAX_BODY}
                answer = await client.post(
                    f"http://127.0.0.1:{receiver.port}/?bk=t0ken", json=big)
        finally:
            await receiver.stop()
        assert answer.status_code == 413
        assert got == []

    def test_token_and_listen_address(self) -> None:
        """The token is added to the URL's query (replacing a stale one); HOST:PORT is
        checked with a clear message."""
        token = callback_token("nonce-1")
        assert token != callback_token("nonce-2") and len(token) == 32
        assert with_token("https://h.example/cb?x=1&bk=old", token) == (
            f"https://h.example/cb?x=1&bk={token}")
        assert parse_listen("0.0.0.0:8787") == ("0.0.0.0", 8787)
        assert parse_listen("[::1]:9000") == ("::1", 9000)
        for bad in ("8787", "host:", "host:99999", ":80"):
            with pytest.raises(ConfigError, match="HOST:PORT"):
                parse_listen(bad)


def _manifest(tmp_path: Path, sim: SimulatorServer, n: int, *, provider: str,
              callback_url: str | None) -> Path:
    jobs = [{"id": f"job-{i:03d}", "prompt": f"scene number {i}"} for i in range(n)]
    path = write_manifest(tmp_path, jobs, provider=provider, base_url=sim.base_url,
                          limits={"max_in_flight": 5, "submit_rate": 100, "task_timeout": "2h"})
    if callback_url:
        data = yaml.safe_load(path.read_text())
        data["provider"]["callback_url"] = callback_url
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def _run_with_callbacks(tmp_path: Path, workdir: Path, sim: SimulatorServer, n: int, *,
                              provider: str, speed: float) -> Any:
    """``n`` jobs with the receiver on and its URL in the manifest; the run must succeed and
    every job's task must have sent a hint."""
    port = _free_port()
    path = _manifest(tmp_path, sim, n, provider=provider,
                     callback_url=f"http://127.0.0.1:{port}/hook")
    summary, engine = await _run(path, workdir, f"127.0.0.1:{port}", speed=speed)
    assert summary.exit_code == 0, summary
    assert engine.hints >= n
    return engine


async def _run(path: Path, workdir: Path, listen: str | None, speed: float = SPEED) -> Any:
    async with Orchestrator(load_manifest(path), workdir=workdir, env=ENV, time_scale=speed,
                            seed=3, callback_listen=listen) as orch:
        summary = await orch.run()
        return summary, orch._engine


@pytest.mark.parametrize("provider", ["kling", "imarouter"])
async def test_callbacks_replace_most_polls(tmp_path: Path, workdir: Path, simulator: Any,
                                            provider: str) -> None:
    """With the receiver on and the URL in the manifest, every job succeeds on one task each,
    the provider's callbacks carry the news, and the run asks the provider far less than a
    run without them: Kling confirms hints several to a list request; ImaRouter, which cannot
    list, with one poll each."""
    n = 20
    sim = simulator(speed=100)  # renders of ~1 s: callbacks well ahead of the fallback polls
    port = _free_port()
    path = _manifest(tmp_path, sim, n, provider=provider,
                     callback_url=f"http://127.0.0.1:{port}/hook")
    summary, engine = await _run(path, workdir, f"127.0.0.1:{port}", speed=100)
    assert summary.exit_code == 0, summary
    stats = sim.stats()
    assert stats["creates"] == n and stats["duplicate_keys"] == []
    assert stats["callbacks_sent"] >= n and engine.hints >= n
    asked = (stats["polls"] + stats["lists"]) / n
    # Without callbacks a run asks about twice per task; with them Kling's hints are
    # confirmed a few to a list (more with more slots), ImaRouter's one poll each.
    assert asked <= (0.8 if provider == "kling" else 1.3), stats


async def test_a_hinted_slot_is_taken_before_its_confirmation(
        tmp_path: Path, workdir: Path, simulator: Any) -> None:
    """Kling confirms hints several to a list request, up to a typical render later. The slot
    a hinted task frees is taken at once all the same — in the store's claims too (the
    worker's credit), not only in the worker — so each create follows the end that freed its
    slot by about a callback's delivery, not by the wait for a confirming list."""
    n, slots = 20, 5
    # x50: the bound below (15 simulated seconds) is 0.3 s of real time, far above a loaded
    # machine's claim and create, while the wait for a confirming list is ~26 s simulated.
    sim = simulator(speed=50, render_sigma=0.3)
    await _run_with_callbacks(tmp_path, workdir, sim, n, provider="kling", speed=50)
    tasks = sorted(sim.tasks(), key=lambda t: t["created_at"])
    assert len(tasks) == n
    ends = sorted(t["ends_at"] for t in tasks)
    # The (slots + i)-th create needed the i-th end of a task to free a slot.
    waits = sorted(tasks[slots + i]["created_at"] - ends[i] for i in range(n - slots))
    typical = sorted(t["render_seconds"] for t in tasks)[n // 2]
    assert waits[len(waits) // 2] <= 0.15 * typical, (waits, typical)  # without: 0.26


async def test_a_hint_ahead_of_a_lagging_gateway_is_confirmed_soon(
        tmp_path: Path, workdir: Path, simulator: Any) -> None:
    """ImaRouter passes the callback URL to Kling, whose callback comes at the real end, while
    the gateway shows the task as it last looked upstream (every 15 s, API.md): the confirming
    poll still says "running". The task is asked again soon (5 s, then 10 s…), not left to the
    fallback poll of a task whose news comes by callback — which came already. Each task is
    read finished within about one gateway look of its end (before: up to 254 s late)."""
    n = 10
    sim = simulator(speed=50, render_median_s=120.0, render_sigma=0.1, status_refresh_s=15.0)
    await _run_with_callbacks(tmp_path, workdir, sim, n, provider="imarouter", speed=50)
    lags = sorted(t["seen_done_at"] - t["ends_at"] for t in sim.tasks())
    assert len(lags) == n
    # The gateway's next look comes within 15 s of an end; then at most one recheck interval.
    assert lags[-1] <= 15 + 20 + 5, lags
    stats = sim.stats()
    assert stats["creates"] == n and stats["polls"] / n <= 5, stats


async def test_callbacks_that_never_come_fall_back_to_polling(
        tmp_path: Path, workdir: Path, simulator: Any) -> None:
    """A callback_url that does not reach the receiver: after three tasks found ended without
    their callback the run polls as usual, and every job still succeeds."""
    sim = simulator()
    path = _manifest(tmp_path, sim, 12, provider="kling",
                     callback_url=f"http://127.0.0.1:{_free_port()}/nowhere")
    summary, engine = await _run(path, workdir, f"127.0.0.1:{_free_port()}")
    assert summary.exit_code == 0, summary
    assert engine.hints == 0 and not all(a.watch.healthy for a in engine.accounts)
    assert sim.stats()["creates"] == 12


async def test_callback_listen_needs_a_public_url(tmp_path: Path, workdir: Path,
                                                  simulator: Any) -> None:
    """--callback-listen without provider.callback_url is bad input, refused before any
    create."""
    sim = simulator()
    path = _manifest(tmp_path, sim, 2, provider="kling", callback_url=None)
    with pytest.raises(ConfigError, match="callback_url"):
        await _run(path, workdir, f"127.0.0.1:{_free_port()}")
    assert sim.stats()["creates"] == 0


async def test_a_false_hint_is_not_believed(tmp_path: Path, workdir: Path,
                                            simulator: Any) -> None:
    """A callback (with the right token) claiming a still-rendering task succeeded, with a URL
    of its own: the confirming poll says otherwise, the task is tracked on, and the job ends
    with the provider's video, not the forged one."""
    sim = simulator(render_median_s=400.0, render_sigma=0.05)
    port = _free_port()
    path = _manifest(tmp_path, sim, 1, provider="kling",
                     callback_url=f"http://127.0.0.1:{port}/hook")
    forged: dict[str, Any] = {}

    async def forge() -> None:
        while not sim.stats()["creates"]:
            await anyio.sleep(0.01)
        await anyio.sleep(0.05)
        task = sim.tasks()[0]
        run_nonce = _nonce(workdir)
        url = with_token(f"http://127.0.0.1:{port}/hook", callback_token(run_nonce))
        body = _kling_task(task["task_id"])
        body["task_result"]["videos"][0]["url"] = "https://evil.example/forged.mp4"
        async with httpx.AsyncClient() as client:
            forged["answer"] = (await client.post(url, json=body)).status_code

    async with anyio.create_task_group() as tg:
        tg.start_soon(forge)
        summary, _engine = await _run(path, workdir, f"127.0.0.1:{port}")
    assert forged["answer"] == 200
    assert summary.exit_code == 0, summary
    from batchkling.outputs.results import read_results

    row = read_results(workdir / "test-run" / "results.csv")[0]
    assert "evil.example" not in row["video_url"]
    assert row["status"] == "succeeded"
    assert sim.stats()["creates"] == 1


def _nonce(workdir: Path) -> str:
    import sqlite3

    con = sqlite3.connect(workdir / "batchkling.db")
    try:
        return str(con.execute("SELECT nonce FROM runs").fetchone()[0])
    finally:
        con.close()


async def test_one_worker_receiver_serves_every_run(tmp_path: Path, workdir: Path,
                                                    simulator: Any) -> None:
    """`worker --callback-listen`: one receiver for the worker, each run's callbacks routed by
    its own token to its own engine. Two runs with callbacks and one without, one worker: all
    finish on one task per job, the hints of both runs are received (the third run is polled,
    not refused), and each run's events are in its own run.log."""
    from batchkling.run.worker import Worker
    from batchkling.store import store_from

    n = 10
    sim = simulator(speed=100)
    port = _free_port()
    for run_id in ("night-a", "night-b", "polled"):
        (tmp_path / run_id).mkdir()
        path = _manifest(tmp_path / run_id, sim, n, provider="kling",
                         callback_url=None if run_id == "polled" else
                         f"http://127.0.0.1:{port}/hook")
        async with Orchestrator(load_manifest(path), run_id=run_id, workdir=workdir,
                                env=ENV) as orch:
            await orch.submit()
    async with store_from(workdir / "batchkling.db") as store:
        worker = Worker(store=store, workdir=workdir, env=ENV, exit_when_idle=True,
                        time_scale=100, callback_listen=f"127.0.0.1:{port}")
        summary = await worker.serve()
        assert worker.callbacks is not None
        received = worker.callbacks.received
    assert summary.exit_code == 0, summary
    assert {r: s.exit_code for r, s in summary.runs.items()} == {
        "night-a": 0, "night-b": 0, "polled": 0}
    stats = sim.stats()
    assert stats["creates"] == 3 * n and stats["duplicate_keys"] == []
    assert received >= 2 * n
    # The two runs went on at once in one process: each run.log holds its own run's events.
    for run_id, other in (("night-a", "night-b"), ("night-b", "polled")):
        text = (workdir / run_id / "run.log").read_text()
        assert f'"run_id":"{run_id}"' in text and f'"run_id":"{other}"' not in text
