"""Provider and disk faults, each ending on the shared invariants (tests/invariants.py), on
each store backend (``store_url``: SQLite, PostgreSQL).

Scenarios (docs/reliability.md numbers them): 3 ambiguous creates, 6 rate limits, 7 account
slots, 8 auth revoked mid-run, 9 ten minutes of poll failures, 11 oversized downloads, 12 disk
problems. Runs that wait on backoff or long deadlines use virtual time
(``batchkling.testing.VirtualSim``); the ones that need a real socket (a create left hanging)
use the simulator on loopback.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import SPEED, SQLITE_UNLESS_ALL, TEST_KEY
from invariants import check_invariants, db_query

import batchkling.run.download
from batchkling.manifest.document import load_manifest
from batchkling.models import RunSummary
from batchkling.providers.base import Provider
from batchkling.providers.imarouter import ImaRouterProvider
from batchkling.providers.kling import KlingProvider
from batchkling.run.orchestrator import Orchestrator
from batchkling.simulator import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, SimulatorServer
from batchkling.testing import VirtualSim, write_manifest

pytestmark = pytest.mark.timeout(60)
RUN = "test-run"
ENV = {"BATCHKLING_TEST_KEY": TEST_KEY, "KLING_ACCESS_KEY": DEFAULT_ACCESS_KEY,
       "KLING_SECRET_KEY": DEFAULT_SECRET_KEY}


def _vsim(**config: Any) -> VirtualSim:
    return VirtualSim(ENV, **config)


def _manifest(folder: Path, sim: SimulatorServer, n: int, *, provider: str = "imarouter",
              **limits: Any) -> Path:
    settings = {"max_in_flight": 5, "submit_rate": 50, "task_timeout": "2h", **limits}
    jobs = [{"id": f"job-{i:03d}", "prompt": f"scene number {i}"} for i in range(n)]
    return write_manifest(folder, jobs, provider=provider, base_url=sim.base_url,
                          limits=settings)


async def _refuse_key(send: Any) -> None:
    """Answer an ASGI request as ImaRouter does for a dead key: 401 invalid_api_key."""
    body = b'{"code":"invalid_api_key","message":"Invalid API key"}'
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def _run(path: Path, workdir: Path, **kwargs: Any) -> RunSummary:
    async with Orchestrator(load_manifest(path), workdir=workdir, env=ENV, time_scale=SPEED,
                            seed=3, **kwargs) as orch:
        return await orch.run()


async def _resume(workdir: Path, store: str) -> RunSummary:
    async with Orchestrator(run_id=RUN, workdir=workdir, store=store, env=ENV, time_scale=SPEED,
                            seed=4) as orch:
        return await orch.resume()


def _events(store: str, event: str) -> list[tuple[Any, ...]]:
    """``(job id, at, data)`` of each such event; ``data`` parsed from its JSON."""
    rows = db_query(store, "SELECT job_id, at, data FROM events WHERE event = ? ORDER BY id",
                    event)
    return [(job, at, _parsed(data)) for job, at, data in rows]


def _parsed(data: Any) -> Any:
    # SQLite keeps the JSON text; PostgreSQL's jsonb comes back parsed.
    return json.loads(data) if isinstance(data, str) else data


class TestAmbiguousCreate:
    """#3: the provider makes the task and the answer never arrives."""

    @pytest.mark.parametrize("provider", ["imarouter", "kling"])
    async def test_hanging_create_answer(self, tmp_path: Path, workdir: Path, simulator: Any,
                                         provider: str, store_url: str) -> None:
        """A create answer held past the client's timeout: ImaRouter reports the job `unknown`
        and sends no second create; Kling finds the task by external_task_id and adopts it."""
        sim = simulator(create_hang_after_create_rate=1.0, hang_s=5.0,
                        honor_idempotency_key=False)
        client: Provider
        if provider == "imarouter":
            client = ImaRouterProvider(sim.base_url, TEST_KEY, timeout=0.4)
        else:
            client = KlingProvider(sim.base_url, access_key=DEFAULT_ACCESS_KEY,
                                   secret_key=DEFAULT_SECRET_KEY, timeout=0.4)
        path = _manifest(tmp_path, sim, 3, provider=provider, max_in_flight=3)
        try:
            summary = await _run(path, workdir, store=store_url, provider=client)
        finally:
            await client.aclose()
        stats = sim.stats()
        assert stats["rejected"]["hung_after_create"] == 3  # every create was left hanging
        assert stats["creates"] == stats["create_requests"] == 3  # and never sent twice
        checked = check_invariants(workdir, RUN, stats, provider=provider, jobs=3, store=store_url)
        if provider == "imarouter":
            assert summary.exit_code == 3
            assert checked.statuses == {"unknown": 3}
            assert all("ReadTimeout" in r["error_message"] for r in checked.rows.values())
        else:
            assert summary.exit_code == 0, summary.stop_reason
            assert checked.statuses == {"succeeded": 3}
            found = [d for _j, _at, d in _events(store_url, "job.reconciled")]
            assert found == [{"found": True}] * 3


class TestRateLimits:
    """#6: 429 with Retry-After on every create for a while."""

    @SQLITE_UNLESS_ALL
    async def test_no_create_before_retry_after_ends(self, tmp_path: Path, workdir: Path,
                                                     store_url: str) -> None:
        """For five virtual minutes the account admits one create per two minutes and answers
        the rest 429 with Retry-After 20: no create is sent while a pause runs, the retries
        stay few, and every job ends downloaded."""
        vs = _vsim(rate_limit_per_s=1 / 120, retry_after_s=20.0)
        path = vs.manifest(tmp_path, 8, limits={"max_in_flight": 8})
        window: dict[str, float] = {}

        async def lift(_orch: Orchestrator) -> None:
            await vs.clock.sleep(300)
            vs.sim.update_config(rate_limit_per_s=None)
            window["end"] = vs.clock.monotonic()

        start = vs.clock.monotonic()
        summary = await vs.run(path, workdir, store=store_url, during=lift)
        assert summary.exit_code == 0, summary
        creates = vs.requests.creates()
        limited = [at for at, status in creates if status == 429]
        assert len(limited) >= 5
        for at, status in creates:
            # Every create after a 429 waits out its Retry-After (virtual seconds, exactly).
            earlier = [t for t in limited if t < at]
            if earlier:
                assert at >= max(earlier) + 20.0 - 1e-6, (at, max(earlier), status)
        in_window = [at for at, _s in creates if at < window["end"]]
        # No storm: one probe per Retry-After, plus the first wave of the run's slots.
        assert len(in_window) <= (window["end"] - start) / 20.0 + 8 + 1
        stats = vs.stats()
        assert stats["creates"] == 8
        print(f"#6: {len(limited)} answers 429, {len(in_window)} create requests in "
              f"{window['end'] - start:.0f} virtual s, {stats['creates']} creates")
        check_invariants(workdir, RUN, stats, jobs=8, store=store_url)

    @SQLITE_UNLESS_ALL
    async def test_pause_starts_when_the_429_arrives(self, tmp_path: Path,
                                                     workdir: Path, store_url: str) -> None:
        """A slow state write after a 429 does not let the next create slip out before the
        Retry-After pause ends."""
        vs = _vsim(rate_limit_per_s=1 / 120, retry_after_s=20.0)
        path = vs.manifest(tmp_path, 4, limits={"max_in_flight": 4, "submit_rate": 10})

        # The store VirtualSim would use (it holds virtual time still while the database
        # works), with every requeue's commit made half a virtual second slower.
        store = vs.store(store_url)
        fast = store.transition

        async def slow_requeues(*args: Any, **kwargs: Any) -> None:
            if kwargs.get("event") == "job.requeued":
                await vs.clock.sleep(0.5)  # a commit on a slow disk: 0.5 s
            await fast(*args, **kwargs)

        store.transition = slow_requeues  # type: ignore[method-assign]
        async with store:
            summary = await vs.run(path, workdir, store=store)
        assert summary.exit_code == 0
        limited = [at for at, status in vs.requests.creates() if status == 429]
        for at, _status in vs.requests.creates():
            earlier = [t for t in limited if t < at]
            if earlier:
                assert at >= max(earlier) + 20.0 - 1e-6, (at, max(earlier))


class TestSlots:
    """#7: an account with fewer slots than max_in_flight."""

    @SQLITE_UNLESS_ALL
    async def test_limit_converges_and_rejections_stay_rare(self, tmp_path: Path,
                                                            workdir: Path, store_url: str) -> None:
        """3 account slots under max_in_flight 20: the provider never holds more than 3 tasks,
        no job fails, and once the limit has converged only occasional probes are refused."""
        vs = _vsim(slot_limit=3)  # virtual time: the slot backoff is in real seconds
        n = 42
        summary = await vs.run(vs.manifest(tmp_path, n, limits={"max_in_flight": 20}), workdir,
                               store=store_url)
        assert summary.exit_code == 0, summary
        stats = vs.stats()
        assert stats["peak_slots"] == 3
        check_invariants(workdir, RUN, stats, jobs=n, store=store_url)
        events = db_query(store_url, "SELECT event FROM events WHERE event IN "
                          "('job.submitted', 'job.requeued') ORDER BY id")
        names = [e for (e,) in events]
        half = [i for i, e in enumerate(names) if e == "job.submitted"][n // 2]
        late = names[half:].count("job.requeued")
        # The first wave learns the limit (up to 17 refusals); after that, one probe every two
        # rounds of the limit — about one refusal per six creates.
        assert names.count("job.requeued") == stats["rejected"]["slots"]
        assert late <= (n // 2) // 6 + 3, late
        print(f"#7: {names.count('job.requeued')} slot refusals, {late} after convergence, "
              f"peak {stats['peak_slots']} slots, {stats['creates']} creates")


class TestAccountRevoked:
    """#8: the key stops working mid-run (auth; credits are tests/test_engine.py)."""

    @pytest.mark.parametrize("provider", ["imarouter", "kling"])
    async def test_key_revoked_mid_run(self, tmp_path: Path, workdir: Path, simulator: Any,
                                       provider: str, store_url: str) -> None:
        """After the account starts refusing the key: no task is created, the run stops with
        exit 4 and the provider's reason, the in-flight tasks are kept without sitting out
        their deadline (polls refused → tracking stops, nothing `timed_out`), and once the key
        works again `resume` finishes every job, each paid once."""
        revoke: dict[str, Any]
        if provider == "imarouter":
            sim = simulator(api_key=TEST_KEY)
            revoke, restore = {"api_key": "sk-rotated-0000000000"}, {"api_key": TEST_KEY}
        else:
            sim = simulator()
            revoke = {"secret_key": "rotated-secret-key"}
            restore = {"secret_key": DEFAULT_SECRET_KEY}
        n = 10
        path = _manifest(tmp_path, sim, n, provider=provider, max_in_flight=2,
                         task_timeout="10m")
        at_switch: dict[str, int] = {}

        async def revoke_after_three() -> None:
            while sim.stats()["creates"] < 3:
                await anyio.sleep(0.002)
            sim.update_config(**revoke)
            stats = sim.stats()
            at_switch.update(creates=stats["creates"], requests=stats["create_requests"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(revoke_after_three)
            summary = await _run(path, workdir, store=store_url)
        assert summary.exit_code == 4, summary
        assert "refused the account" in (summary.stop_reason or "")
        stats = sim.stats()
        assert stats["creates"] == at_switch["creates"]  # zero creates afterwards
        assert stats["create_requests"] - at_switch["requests"] <= 2  # the ones under way
        print(f"#8 {provider}: revoked after {at_switch['creates']} creates, "
              f"{stats['create_requests'] - at_switch['requests']} refused create requests after")
        checked = check_invariants(workdir, RUN, stats, provider=provider, jobs=n, store=store_url)
        assert checked.statuses["pending"] >= n - at_switch["creates"]
        assert not _events(store_url, "job.timed_out")
        in_flight = db_query(store_url, "SELECT job_id FROM jobs WHERE state IN "
                                      "('submitted', 'running')")
        refused = {job for job, _at, _data in _events(store_url, "job.poll_refused")}
        assert refused == {job for (job,) in in_flight}
        print(f"#8 {provider}: {len(refused)} tasks in flight kept, polling stopped")
        sim.update_config(**restore)
        resumed = await _resume(workdir, store_url)
        assert resumed.exit_code == 0, resumed
        stats = sim.stats()
        assert stats["creates"] == n
        checked = check_invariants(workdir, RUN, stats, provider=provider, jobs=n, store=store_url)
        assert checked.statuses == {"succeeded": n}
        assert not any(r["error_message"] for r in checked.rows.values())  # no stale reason

    async def test_a_deadline_reached_while_polls_are_refused_is_not_a_timeout(
            self, tmp_path: Path, workdir: Path, store_url: str) -> None:
        """Every poll refused (the key died after the create), and the deadline comes before
        the third refusal: the task was never seen to time out, so the job keeps its task with
        the refusal as the reason — not `timed_out`."""
        vs = _vsim()
        inner = vs.requests.app

        async def refuse_polls(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["method"] == "GET" \
                    and scope.get("path", "").startswith("/v1/videos/video_"):
                await _refuse_key(send)
                return
            await inner(scope, receive, send)

        vs.requests.app = refuse_polls
        # First poll after ~10 s, the next one capped at the 15 s deadline: two refusals.
        path = vs.manifest(tmp_path, 1, limits={"max_in_flight": 1, "task_timeout": "15s"})
        summary = await vs.run(path, workdir, store=store_url)
        assert summary.exit_code != 0, summary
        assert not _events(store_url, "job.timed_out")
        assert [job for job, _at, _data in _events(store_url, "job.poll_refused")] == ["job-000"]
        assert db_query(store_url, "SELECT state FROM jobs") in ([("submitted",)], [("running",)])

    async def test_a_refused_poll_now_and_then_is_not_a_dead_key(self, tmp_path: Path,
                                                                 workdir: Path,
                                                                 store_url: str) -> None:
        """A 401 on each task's first poll (a gateway blip), with creates still accepted: the
        tasks are polled on and every job finishes; only refusals in a row stop tracking."""
        vs = _vsim()
        refused: set[str] = set()
        inner = vs.requests.app

        async def blip(scope: Any, receive: Any, send: Any) -> None:
            path = scope.get("path", "")
            if scope["type"] == "http" and scope["method"] == "GET" \
                    and path.startswith("/v1/videos/video_") and path not in refused:
                refused.add(path)
                await _refuse_key(send)
                return
            await inner(scope, receive, send)

        vs.requests.app = blip
        n = 4
        summary = await vs.run(vs.manifest(tmp_path, n), workdir, store=store_url)
        assert summary.exit_code == 0, summary
        assert len(refused) == n
        assert not _events(store_url, "job.poll_refused")
        checked = check_invariants(workdir, RUN, vs.stats(), jobs=n, store=store_url)
        assert checked.statuses == {"succeeded": n}


class TestPollFailures:
    """#9: ten minutes in which every poll fails, on virtual time."""

    @SQLITE_UNLESS_ALL
    @pytest.mark.parametrize("provider", ["imarouter", "kling"])
    async def test_ten_minutes_of_failed_polls(self, tmp_path: Path, workdir: Path,
                                               provider: str, store_url: str) -> None:
        """Every poll answers 5xx or drops the connection for ten minutes: no job fails or
        times out, no create is sent again, and each finished task is noticed within one
        maximum poll interval (120 s) of the failures ending."""
        vs = _vsim(poll_5xx_rate=1.0, poll_drop_rate=0.3)
        n = 6
        path = vs.manifest(tmp_path, n, provider=provider, limits={"max_in_flight": n})
        healed: dict[str, float] = {}

        async def heal(_orch: Orchestrator) -> None:
            await vs.clock.sleep(600)
            vs.sim.update_config(poll_5xx_rate=0.0, poll_drop_rate=0.0)
            healed["wall"] = vs.clock.wall()

        summary = await vs.run(path, workdir, store=store_url, during=heal)
        assert summary.exit_code == 0, summary
        stats = vs.stats()
        assert stats["creates"] == stats["create_requests"] == n
        faults = stats["rejected"].get("server_error", 0) + stats["rejected"].get("dropped", 0)
        # Kling's list reports all six tasks per request, so fewer requests fail there.
        assert faults >= (5 * n if provider == "imarouter" else 20)
        # Every render ended (a few virtual minutes) well inside the failure window.
        done = [at for _job, at, _data in _events(store_url, "job.succeeded")]
        assert len(done) == n
        assert all(0 <= at - healed["wall"] <= 126.0 for at in done), (
            [round(at - healed["wall"]) for at in done])
        print(f"#9 {provider}: {faults} failed polls over 600 virtual s, {stats['polls']} polls, "
              f"noticed {max(at - healed['wall'] for at in done):.0f} s after the failures ended")
        checked = check_invariants(workdir, RUN, stats, provider=provider, jobs=n, store=store_url)
        assert checked.statuses == {"succeeded": n}


class TestDownloadLimits:
    """#11: a body larger than the limit, through a whole run."""

    async def test_oversized_video_is_refused_and_not_rerendered(
            self, tmp_path: Path, workdir: Path, store_url: str) -> None:
        """Videos over output.max_video_mb are not written: the job keeps its paid render
        with the reason, and after the limit is raised a re-run downloads it without a new
        task."""
        vs = _vsim()
        n = 3
        summary = await vs.run(vs.manifest(tmp_path, n, output={"max_video_mb": 0.001}),
                               workdir, store=store_url)
        assert summary.exit_code == 3
        checked = check_invariants(workdir, RUN, vs.stats(), jobs=n, store=store_url)
        assert checked.statuses == {"pending": n}
        assert all("over the 1,048-byte limit" in r["error_message"]
                   for r in checked.rows.values())
        assert not list(workdir.rglob("*.mp4"))
        assert vs.stats()["downloads"] == n  # refused on Content-Length once, not retried
        summary = await vs.run(vs.manifest(tmp_path, n, output={"max_video_mb": 50}), workdir,
                               store=store_url)
        assert summary.exit_code == 0
        stats = vs.stats()
        assert stats["creates"] == n
        checked = check_invariants(workdir, RUN, stats, jobs=n, store=store_url)
        assert checked.statuses == {"succeeded": n}


class TestDisk:
    """#12: the videos folder vanishes or is replaced, the disk fills up."""

    async def test_videos_folder_replaced_by_a_file(self, tmp_path: Path,
                                                    workdir: Path, store_url: str) -> None:
        """With `videos` turned into a file while tasks render, downloads fail with a reason
        naming the path, nothing is marked downloaded, and a resume after the folder is back
        downloads every video without a new task."""
        vs = _vsim()
        n = 4
        videos = workdir / RUN / "videos"

        async def replace(_orch: Orchestrator) -> None:
            await vs.clock.sleep(10)  # created, not finished
            shutil.rmtree(videos, ignore_errors=True)
            videos.write_text("not a folder")

        summary = await vs.run(vs.manifest(tmp_path, n), workdir, store=store_url, during=replace)
        assert summary.exit_code == 3
        checked = check_invariants(workdir, RUN, vs.stats(), jobs=n, store=store_url)
        assert checked.statuses == {"pending": n}
        assert all(f"cannot write {videos}/" in r["error_message"]
                   for r in checked.rows.values())
        videos.unlink()
        summary = await vs.resume(RUN, workdir, store=store_url)
        assert summary.exit_code == 0
        stats = vs.stats()
        assert stats["creates"] == n
        checked = check_invariants(workdir, RUN, stats, jobs=n, store=store_url)
        assert checked.statuses == {"succeeded": n}

    async def test_disk_full_during_download(self, tmp_path: Path, workdir: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             store_url: str) -> None:
        """ENOSPC while writing a video: a clear error, no partial file, nothing marked
        downloaded; once there is space a resume downloads every video without a new task."""
        vs = _vsim()
        n = 3

        class FullDisk:
            def __init__(self, real: Any) -> None:
                self.real = real

            def __enter__(self) -> FullDisk:
                return self

            def __exit__(self, *exc: object) -> None:
                self.real.close()

            def write(self, data: bytes) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")

            def __getattr__(self, name: str) -> Any:
                return getattr(self.real, name)

        def full_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            return FullDisk(open(path, mode, *args, **kwargs))

        monkeypatch.setattr(batchkling.run.download, "open", full_open, raising=False)
        summary = await vs.run(vs.manifest(tmp_path, n), workdir, store=store_url)
        assert summary.exit_code == 3
        checked = check_invariants(workdir, RUN, vs.stats(), jobs=n, store=store_url)
        assert checked.statuses == {"pending": n}
        assert all("No space left on device" in r["error_message"]
                   for r in checked.rows.values())
        assert not list(workdir.rglob("*.mp4*"))
        monkeypatch.undo()
        summary = await vs.resume(RUN, workdir, store=store_url)
        assert summary.exit_code == 0
        stats = vs.stats()
        assert stats["creates"] == n
        checked = check_invariants(workdir, RUN, stats, jobs=n, store=store_url)
        assert checked.statuses == {"succeeded": n}

    async def test_videos_folder_deleted_mid_run(self, tmp_path: Path, workdir: Path,
                                                 store_url: str) -> None:
        """The videos folder deleted after some downloads: later downloads recreate it, and a
        resume fetches the lost videos again (from the provider's URL, no new task), so every
        `succeeded` row is on disk."""
        vs = _vsim()
        n = 6
        videos = workdir / RUN / "videos"

        async def delete(_orch: Orchestrator) -> None:
            while len(list(videos.glob("*.mp4"))) < 2:
                await vs.clock.sleep(1)
            shutil.rmtree(videos)

        summary = await vs.run(vs.manifest(tmp_path, n, limits={"max_in_flight": 2}),
                               workdir, store=store_url, during=delete)
        assert summary.exit_code == 0
        assert 0 < len(list(videos.glob("*.mp4"))) < n  # some videos went with the folder
        await vs.resume(RUN, workdir, store=store_url)
        stats = vs.stats()
        assert stats["creates"] == n
        checked = check_invariants(workdir, RUN, stats, jobs=n, store=store_url)
        assert checked.statuses == {"succeeded": n}
