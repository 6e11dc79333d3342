"""The store's money methods on every backend (``store_url``): observed prices kept across
runs, reservations raised for a price group, unit totals, reuse sources, cost totals."""

from __future__ import annotations

import pytest
from invariants import db_query

from batchkling.models import JobSpec, JobState
from batchkling.store import Store, store_from
from batchkling.store.interface import ClaimOutcome, Intent
from batchkling.store.rows import JobRow


def _spec(job_id: str, prompt: str = "p") -> JobSpec:
    return JobSpec(job_id=job_id, model="kling-v2-6", prompt=prompt, duration=5, size="16:9")


async def _store(location: str, runs: dict[str, list[JobSpec]]) -> Store:
    store = store_from(location)
    await store.open()
    for run_id, specs in runs.items():
        await store.save_run(run_id, manifest_path=None, manifest_text=None, config_json="{}",
                             provider="kling", base_url="http://x", simulated=False, now=1.0)
        await store.sync_jobs(run_id, added=list(enumerate(specs)), changed=[], reordered=[],
                              removed=[], now=1.0)
    await store.register_worker("w", runs=None, now=1.0)
    await store.ensure_account("acct", provider="kling", max_in_flight=10, now=1.0)
    return store


async def _claim(store: Store, run_id: str, usd: float, units: float = 0.0, *,
                 max_usd: float | None = None, max_units: float | None = None) -> JobRow | None:
    def intent(job: JobRow) -> Intent:
        return Intent(new_attempt=(job.attempt + 1, f"k-{job.job_id}"), reserved_usd=usd,
                      reserved_units=units, price_group="g")

    claim = await store.claim(run_id, worker_id="w", account_id="acct", slot_cap=10,
                              intent=intent, max_usd=max_usd, max_units=max_units, now=2.0)
    return claim.job if claim.outcome is ClaimOutcome.CLAIMED else None


async def test_observed_prices_are_kept_across_runs(store_url: str) -> None:
    """The latest price of a group wins, a missing currency keeps its last value, and a store
    opened afresh still has them."""
    store = await _store(store_url, {})
    await store.record_price("g", usd=0.4, units=None, now=1.0)
    await store.record_price("g", usd=None, units=4.0, now=2.0)
    await store.record_price("g", usd=0.5, units=None, now=3.0)
    await store.aclose()
    again = store_from(store_url)
    async with again:
        (found,) = (await again.observed_prices()).values()
        assert (found.usd, found.units, found.samples, found.updated_at) == (0.5, 4.0, 3, 3.0)


async def test_a_price_above_the_reservations_raises_every_one_in_flight(store_url: str) -> None:
    """raise_reservations lifts the group's jobs that hold money — in flight, timed out,
    unknown — never lowers one, leaves settled jobs alone, and the run's committed money
    follows at once."""
    store = await _store(store_url, {"r": [_spec(j) for j in "abcd"]})
    for _ in "abcd":
        assert await _claim(store, "r", 0.375, 3.75) is not None
    await store.transition("r", "b", JobState.TIMED_OUT, now=3.0, event="e")
    await store.transition("r", "c", JobState.SUCCEEDED, now=3.0, event="e", cost_usd=0.75,
                           reserved_usd=0, reserved_units=0)
    await store.transition("r", "d", JobState.RUNNING, now=3.0, event="e", reserved_usd=2.0)
    assert await store.raise_reservations("g", usd=0.75, units=None) == 2  # a and b
    reserved = dict(db_query(store_url, "SELECT job_id, reserved_usd FROM jobs"))
    assert reserved == {"a": 0.75, "b": 0.75, "c": 0, "d": 2.0}
    assert await store.money("r") == pytest.approx((0.75, 0.75 + 3.5))
    assert await store.raise_reservations("g", usd=None, units=7.5) == 3
    assert await store.money_units("r") == pytest.approx((0.0, 3 * 7.5))
    assert await store.raise_reservations("other", usd=9, units=9) == 0
    await store.aclose()


async def test_the_claim_holds_the_units_cap(store_url: str) -> None:
    """A claim whose units would pass max_units is refused as BUDGET, naming the units cap;
    reported units count as spent."""
    store = await _store(store_url, {"r": [_spec(j) for j in "abc"]})
    assert await _claim(store, "r", 0, 4.0, max_units=10) is not None
    await store.transition("r", "a", JobState.SUCCEEDED, now=3.0, event="e", cost_units=5.0,
                           reserved_units=0)
    assert await _claim(store, "r", 0, 4.0, max_units=10) is not None  # 5 + 4 ≤ 10
    refused = await store.claim(
        "r", worker_id="w", account_id="acct", slot_cap=10, max_usd=None, max_units=10,
        intent=lambda job: Intent(new_attempt=(1, "k"), reserved_usd=0, reserved_units=4.0),
        now=4.0)
    assert refused.outcome is ClaimOutcome.BUDGET and refused.cap == "units"
    assert (refused.price, refused.committed_usd) == (4.0, 9.0)
    await store.aclose()


async def test_reuse_sources_and_mark_reused(store_url: str) -> None:
    """A pending job finds downloaded videos of its fingerprint in other runs (newest first,
    never its own run's); marking it reused makes it downloaded at $0 with no attempt, once."""
    store = await _store(store_url, {"old": [_spec("a"), _spec("b", "other")],
                                     "older": [_spec("x")], "new": [_spec("a"), _spec("c", "new")]})
    for run_id, job_id, at in (("older", "x", 5.0), ("old", "a", 6.0)):
        await store.transition(run_id, job_id, JobState.DOWNLOADED, now=at, event="e",
                               video_path=f"/v/{run_id}.mp4", video_size=10,
                               video_sha256=f"sha-{run_id}")
    sources = await store.reuse_sources("new")
    assert [(s.job_id, s.source) for s in sources] == [("a", "old/a"), ("a", "older/x")]
    assert await store.downloaded_fingerprints() == [_spec("a").fingerprint]
    assert await store.downloaded_fingerprints(after=_spec("a").fingerprint) == []
    assert await store.mark_reused("new", "a", sources[0], video_path="/v/new.mp4",
                                   video_uri=None, video_etag=None, now=7.0)
    assert not await store.mark_reused("new", "a", sources[0], video_path="/v/new.mp4",
                                       video_uri=None, video_etag=None, now=8.0)
    job = await store.get_job("new", "a")
    assert job is not None and job.state is JobState.DOWNLOADED
    assert (job.reused_from, job.cost_usd, job.video_sha256, job.attempt) == (
        "old/a", 0, "sha-old", 0)
    assert await store.attempts("new", "a") == []
    assert await store.reuse_sources("new") == []
    assert await store.integrity_check() == "ok"
    await store.aclose()


async def test_cost_totals_sum_the_attempts_of_jobs_rendered_twice(store_url: str) -> None:
    """Only jobs with more than one attempt are listed, with every attempt's cost summed."""
    store = await _store(store_url, {"r": [_spec("a"), _spec("b")]})
    for number, cost in ((1, 0.25), (2, 0.4)):
        await store.transition("r", "a", JobState.SUBMITTING, now=2.0, event="e",
                               new_attempt=(number, f"k{number}"))
        await store.transition("r", "a", JobState.SUCCEEDED, now=3.0, event="e", cost_usd=cost)
    await store.transition("r", "b", JobState.SUBMITTING, now=2.0, event="e",
                           new_attempt=(1, "kb"))
    await store.transition("r", "b", JobState.SUCCEEDED, now=3.0, event="e", cost_usd=0.25)
    assert await store.cost_totals("r") == {"a": pytest.approx(0.65)}
    await store.aclose()


async def test_units_totals_follow_reported_units(store_url: str) -> None:
    """The run's spent units are the attempts' reported units; committed adds reservations."""
    store = await _store(store_url, {"r": [_spec("a")]})
    await store.transition("r", "a", JobState.SUBMITTING, now=2.0, event="e",
                           new_attempt=(1, "k"), reserved_units=3.75)
    assert await store.money_units("r") == (0.0, 3.75)
    await store.transition("r", "a", JobState.SUCCEEDED, now=3.0, event="e", cost_units=4.0,
                           reserved_units=0)
    assert await store.money_units("r") == (4.0, 4.0)
    assert await store.units("r") == 4.0
    await store.aclose()
