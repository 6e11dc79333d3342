"""The poll planner: learned render times, progress, reported starts, and its floors."""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from pathlib import Path
from typing import cast

import pytest
from conftest import TEST_KEY

from batchkling.clock import SystemClock
from batchkling.errors import ProviderError
from batchkling.models import JobSpec, JobState
from batchkling.providers.kling import KlingProvider
from batchkling.run.polling import (
    FIRST_SHARE,
    LOOK_NEED,
    LOOK_PROBATION,
    LogNormal,
    Looks,
    PollPlanner,
    RenderModel,
    TaskPlan,
    end_range,
)
from batchkling.run.watch import LIST_THRESHOLD, TAIL_BATCH, Watch
from batchkling.simulator import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY
from batchkling.store import store_from
from batchkling.testing import VirtualSim, write_manifest


def _planner(**kwargs: float) -> PollPlanner:
    return PollPlanner(**{"min_interval": 5.0, "max_interval": 600.0, "hard_floor": 0.5,
                          **kwargs})


def _learned(planner: PollPlanner, group: str = "g", median: float = 90.0, n: int = 40,
             seed: int = 1) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        planner.observe(group, median * math.exp(0.35 * rng.gauss(0, 1)))


class TestLogNormal:
    def test_fit_recovers_median_and_spread(self) -> None:
        """A fit of 2,000 log-normal draws finds their median and sigma."""
        rng = random.Random(3)
        fit = LogNormal.fit(60 * math.exp(0.3 * rng.gauss(0, 1)) for _ in range(2000))
        assert fit is not None
        assert fit.median == pytest.approx(60, rel=0.03)
        assert fit.sigma == pytest.approx(0.3, rel=0.05)

    def test_conditional_quantile_moves_past_what_elapsed(self) -> None:
        """Of the tasks still running at the median, half are done by the 75th percentile."""
        fit = LogNormal(math.log(90), 0.35)
        later = fit.quantile_after(0.5, after=fit.median)
        assert later == pytest.approx(fit.quantile(0.75), rel=1e-6)
        assert fit.done_by(later, after=fit.median) == pytest.approx(0.5, abs=1e-6)

    def test_far_past_every_task_it_keeps_growing(self) -> None:
        """Long after the distribution says all are done, the next time still lies ahead."""
        fit = LogNormal(math.log(10), 0.1)
        assert fit.quantile_after(0.5, after=1000) > 1000

    def test_tasks_still_running_count_in_the_fit(self) -> None:
        """Early in a run only the short tasks have finished: fitted alone they put the median
        a third too low. Counting the running ones as "longer than their age" recovers it."""
        rng = random.Random(5)
        draws = [60 * math.exp(0.3 * rng.gauss(0, 1)) for _ in range(200)]
        now = 60.0  # half of them are done
        done = [x for x in draws if x <= now]
        running = [now for x in draws if x > now]
        alone = LogNormal.fit(done)
        both = LogNormal.fit(done, running)
        assert alone is not None and both is not None
        assert alone.median < 0.8 * 60
        assert both.median == pytest.approx(60, rel=0.05)
        assert both.sigma == pytest.approx(0.3, rel=0.15)

    def test_a_plan_in_flight_counts_until_its_task_ends(self) -> None:
        """A group's model counts its tasks in flight at their last sight while it has
        finished few: a task still running long after the few short ones moves the median."""
        planner = _planner()
        running = planner.plan("g")
        for seconds in (10.0, 11.0, 12.0, 10.5, 11.5):
            planner.finished("g", planner.plan("g"), seconds)
        alone = planner.model("g").times
        running.observe(40.0, running=True, progress=None)
        planner.observe("g", 11.0)  # a refit
        counted = planner.model("g").times
        assert alone is not None and counted is not None
        assert counted.median > alone.median * 1.1
        planner.finished("g", running, 41.0)
        assert running not in planner.model("g")._live


class TestEndRange:
    def test_two_readings_pin_the_end(self) -> None:
        """Started at 2 s, rendering 100 s: readings at 32 s (30 %) and 72 s (70 %) put the
        end within two seconds of 102 s (a reading may be floored or rounded)."""
        low, high = end_range([(32.0, 30), (72.0, 70)], start_low=0, start_high=32,
                              running_at=72, longest=1000)
        assert 99.9 <= low <= 102 <= high <= 104

    def test_one_reading_leaves_the_start_open(self) -> None:
        """One reading at 50 % with the start anywhere in [1, 3] s: the end lies in a range
        about as wide as that (times 100/p - 1)."""
        low, high = end_range([(52.0, 50)], start_low=1, start_high=3, running_at=52,
                              longest=1000)
        assert low == pytest.approx(3 + 49 * 100 / 51, rel=1e-6)  # late start, 51 % done
        assert high == pytest.approx(1 + 51 * 100 / 49.5, rel=1e-6)  # early start, 49.5 %

    def test_one_reading_closed_form_matches_the_polygon(self) -> None:
        """The single-reading shortcut gives the polygon's answer (caps and all)."""
        rng = random.Random(1)
        for _ in range(3000):
            t, p = rng.uniform(1, 100), rng.randint(1, 99)
            low, u = rng.uniform(0, t), rng.uniform(t, 3 * t)
            kwargs = {"start_low": low, "start_high": rng.uniform(low, t + 5),
                      "running_at": u, "longest": rng.uniform(t, 300 * t)}
            fast = end_range([(t, p)], **kwargs)
            full = end_range([(t, p), (t, p)], **kwargs)  # two readings: the general path
            assert (fast is None) == (full is None)
            if fast and full:
                assert fast == pytest.approx(full, rel=1e-9)

    def test_readings_that_cannot_be_linear_give_none(self) -> None:
        """Progress that went backwards fits no straight line."""
        assert end_range([(10.0, 50), (20.0, 20)], start_low=0, start_high=10, running_at=20,
                         longest=1000) is None


class TestTaskPlan:
    def test_first_poll_goes_where_few_tasks_are_done(self) -> None:
        """With the group learned, the first poll comes when 15 % of such tasks are done."""
        planner = _planner()
        _learned(planner)
        plan = planner.plan("g")
        times = planner.model("g").times
        assert times is not None
        assert planner.delay(plan, 0.0) == pytest.approx(times.quantile(FIRST_SHARE))
        assert not plan.blind

    def test_a_predicted_end_is_not_held_to_the_blind_floor(self) -> None:
        """Two progress readings predict the end 1.2 s from now: the poll comes then, not at
        the 5 s floor of blind polling."""
        planner = _planner()
        plan = planner.plan("g")
        plan.observe(40.0, running=True, progress=38)
        plan.polled(40.0)
        plan.observe(100.0, running=True, progress=98)
        plan.polled(100.0)
        delay = planner.delay(plan, 100.0)
        assert 0.5 <= delay < 5.0
        assert 100.0 + delay >= 102.0 - 1.0  # at (or just past) the predicted end

    def test_a_first_reading_of_one_percent_does_not_cap_the_render(self) -> None:
        """Providers report 1 % for anything under it, so a 1 % reading 5 s after the create
        says nothing of how long the render is. A 627 s render (started at 1.4 s) read 1 % at
        5 s and 40 % at 252 s ends between 604 and 640 s: the next poll aims there. (It was
        taken for a render of at most 501 s, so no steady render fitted both readings, and the
        task was polled blind, every 120 s, and found ended up to two minutes late.)"""
        planner = _planner(min_interval=5.0, max_interval=120.0)
        plan = planner.plan("g")
        plan.polled(5.0)
        plan.observe(5.0, running=True, progress=1)
        plan.polled(252.0)
        plan.observe(252.0, running=True, progress=40)
        delay = planner.delay(plan, 252.0)
        assert not plan.blind
        assert plan.span is not None
        earliest, latest, _ = plan.span
        assert 595 <= earliest <= 628.4 <= latest <= 645
        assert 595 <= 252.0 + delay <= 645

    def test_readings_of_a_lagging_gateway_still_aim_the_poll(self) -> None:
        """Before a gateway's lag is learned, its readings are taken as of the poll though
        they show its last look, up to a pass earlier. A 627 s render started at 1.4 s, read
        0 % at 15 s (a look before the create), 2 % at 22 s and 32 % at 206 s (looks at about
        14 s and 202 s): no steady render fits both percents as of their polls. The latest
        reading alone still pins the end to a minute: the next poll aims there, not at the
        blind schedule (every two minutes, which read such ends up to 100 s late)."""
        planner = _planner(min_interval=5.0, max_interval=120.0)
        plan = planner.plan("g")
        for t, p in ((5.0, 0), (10.0, 0), (15.0, 0), (22.0, 2), (206.0, 32)):
            plan.polled(t)
            plan.observe(t, running=True, progress=p)
        delay = planner.delay(plan, 206.0)
        assert not plan.blind
        assert plan.span is not None
        earliest, latest, _ = plan.span
        assert earliest <= 628.4 <= latest <= 628.4 + 30
        assert 560 <= 206.0 + delay <= 660

    def test_hard_floor_between_two_polls_of_a_task(self) -> None:
        """However close the predicted end, a task is not polled twice within 0.5 s."""
        planner = _planner()
        plan = planner.plan("g")
        plan.observe(50.0, running=True, progress=49)
        plan.polled(50.0)
        plan.observe(99.9, running=True, progress=99)
        plan.polled(99.9)
        assert planner.delay(plan, 99.9) >= 0.5

    def test_blind_polling_keeps_the_floor_and_grows_geometrically(self) -> None:
        """Nothing learnt, no progress: intervals start at the floor and grow with the time
        elapsed, so a long render costs a logarithmic number of polls."""
        planner = _planner(min_interval=0.1)
        plan = planner.plan("g")
        elapsed = 0.0
        delays = []
        while elapsed < 300:
            delay = planner.delay(plan, elapsed)
            assert plan.blind
            delays.append(delay)
            elapsed += delay
            plan.polled(elapsed)
            plan.observe(elapsed, running=True, progress=None)
        assert delays[0] == pytest.approx(0.1)
        assert all(d >= 0.1 for d in delays)
        assert len(delays) <= math.log(300 / 0.1, 1.5) + 2

    def test_provider_hint_is_honoured(self) -> None:
        """openai-poll-after-ms (or Retry-After) is a floor for the next poll."""
        planner = _planner()
        _learned(planner)
        assert planner.delay(planner.plan("g"), 0.0, hint=70.0) >= 70.0

    def test_ceiling_holds_blind_polls_only(self) -> None:
        """Blind, no delay exceeds max_interval; aimed at a learned 10,000 s, it may."""
        planner = _planner(max_interval=60)
        plan = planner.plan("g")
        plan.polled(1000.0)
        plan.observe(1000.0, running=True, progress=None)
        assert planner.delay(plan, 1000.0) == 60
        planner.observe("g", 10_000)
        assert planner.delay(planner.plan("g"), 0.0) > 60

    def test_reported_start_narrows_a_render_without_progress(self) -> None:
        """Kling reports no progress but when rendering began: once render times are known,
        the next poll is conditioned on the render time elapsed since that start."""
        planner = _planner()
        rng = random.Random(5)
        for _ in range(30):
            start = 1 + 2 * rng.random()
            planner.observe("g", start + 90 * math.exp(0.35 * rng.gauss(0, 1)), start=start)
        renders = planner.model("g").renders
        assert renders is not None
        plan = planner.plan("g")
        plan.polled(60.0)
        plan.observe(60.0, running=True, progress=None, start=2.5)
        target = 60.0 + planner.delay(plan, 60.0)
        assert target == pytest.approx(2.5 + renders.quantile_after(0.45, after=57.5))

    def test_prior_counts_until_the_run_has_its_own(self) -> None:
        """Earlier runs' times set the first polls; five of this run's replace them."""
        model = RenderModel(prior=[300.0] * 20)
        assert model.typical() == pytest.approx(300.0)
        for _ in range(5):
            model.observe(30.0)
        assert model.typical() == pytest.approx(30.0)

    def test_memory_is_bounded(self) -> None:
        """A group keeps its last 64 times, not every task's."""
        model = RenderModel()
        for i in range(10_000):
            model.observe(10.0 + i % 7, start=1.0)
        assert len(model._times) == len(model._starts) == len(model._renders) == 64

    def test_end_estimate_uses_the_fitted_line(self) -> None:
        """A task seen at 30 % and 70 % and found done at 110 s ended near 102 s, which is
        what the group learns (not the 110 s it was seen done)."""
        plan = TaskPlan(RenderModel())
        plan.observe(32.0, running=True, progress=30)
        plan.observe(72.0, running=True, progress=70)
        assert plan.ended_at(110.0, None) == pytest.approx(102.5, abs=1.5)
        assert plan.render_start() == pytest.approx(1.5, abs=1.5)

    def test_a_late_start_is_learned_from_one_reading_and_the_reported_end(self) -> None:
        """A task that started late (2.85 s in) is read once at 23 % and found done 1.6 s
        after its end. Its start is learned from that reading and the provider's end (whole
        seconds: ±1 s) — before, only tasks read twice taught starts, so the late starters
        never did and the group's start range stayed too early for them."""
        planner = _planner()
        plan = planner.plan("g")
        plan.observe(3.96, running=True, progress=23)
        planner.finished("g", plan, 9.12, reported=7.0, precision=1.0)
        assert planner.model("g")._starts == deque([pytest.approx(2.85, abs=0.4)])
        # Read at 90 %, the same end pins no start (one second of the end moves it by nine).
        other = planner.plan("g")
        other.observe(6.6, running=True, progress=90)
        planner.finished("g", other, 7.2, reported=7.0, precision=1.0)
        assert len(planner.model("g")._starts) == 1


def _gateway_dates(rng: random.Random, n: int, period: float, phase: float,
                   noise: float) -> list[float]:
    """Ends a gateway dates by its looks (one loop, ``period`` apart), each ``± noise``."""
    out, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(1 / 4)
        out.append(phase + period * math.ceil((t - phase) / period) + rng.uniform(-noise, noise))
    return out


class TestLooks:
    def test_a_gateway_loop_is_learned_from_the_ends_it_dates(self) -> None:
        """Ends dated by a gateway's looks (15.4 s apart here, to ±1 s: whole-second stamps)
        give its period and phase — not before enough of them, and the next ones checked."""
        rng = random.Random(5)
        period, phase = 15.4, 6.0
        looks = Looks(5.0, 60.0)
        for i, at in enumerate(_gateway_dates(rng, 60, period, phase, 1.0)):
            looks.saw(at, 1.0)
            if i < LOOK_NEED + LOOK_PROBATION - 1:
                assert looks.period is None, i
        assert looks.period == pytest.approx(period, abs=0.2)
        late = 60 * 4.0
        assert looks.last(late) is not None
        true_last = phase + period * math.floor((late - phase) / period)
        assert abs(cast(float, looks.last(late)) - true_last) <= 1.0
        assert 0.5 < looks.slack < 3.0

    def test_ends_on_no_schedule_never_make_one(self) -> None:
        """Ends at any time (a provider that asks upstream at each poll, Kling itself), bunched
        or spread, never make a schedule; nor do dates too coarse to place looks, nor any
        dates from a provider that does not lag."""
        for seed in range(40):
            rng = random.Random(seed)
            looks, t = Looks(5.0, 60.0), 0.0
            for _ in range(100):
                t += rng.expovariate(1 / rng.choice([0.5, 3.0, 12.0]))
                looks.saw(t, 0.001)
            assert looks.period is None, seed
            # A long burst of ends half a second apart, to the millisecond or the second.
            coarse = seed % 2 == 1
            looks, t = Looks(5.0, 60.0), 0.0
            for _ in range(150):
                t += rng.expovariate(2.0)
                looks.saw(float(int(t)) if coarse else t, 1.0 if coarse else 0.001)
            assert looks.period is None, seed
        coarse, direct = Looks(5.0, 60.0), Looks(5.0, 60.0, sought=False)
        for at in _gateway_dates(random.Random(1), 60, 15.0, 2.0, 0.0):
            coarse.saw(at, 2.0)  # a date good to 2 s cannot place looks 5 s apart
            direct.saw(at, 0.001)  # a provider that answers with the state now (Kling's)
        assert coarse.period is None and direct.period is None

    def test_a_loop_that_moves_is_followed_and_one_that_ends_is_dropped(self) -> None:
        """The gateway restarts (its loop's phase jumps): the looks ahead are counted from the
        latest one dated, so the schedule follows at once. Ends that leave any loop (the
        provider stopped lagging) drop it after three of four."""
        rng = random.Random(2)
        looks = Looks(5.0, 60.0)
        for at in _gateway_dates(rng, 40, 15.0, 3.0, 0.0):
            looks.saw(at, 0.001)
        assert looks.period is not None
        epoch, shift = looks.epoch, 40 * 4.0 + 100
        moved = [shift + at for at in _gateway_dates(rng, 40, 15.0, 10.5, 0.0)]
        for at in moved:
            looks.saw(at, 0.001)
        assert looks.period == pytest.approx(15.0, abs=0.1) and looks.epoch == epoch
        assert abs(cast(float, looks.last(moved[-1] + 20)) - (moved[-1] + 15)) < 0.1
        t = moved[-1]
        for i in range(8):
            t += rng.uniform(3.7, 11.3)  # never a whole number of periods from the last
            looks.saw(t, 0.001)
            if i == 3:
                assert looks.period is None and looks.epoch == epoch + 1

    def test_a_drifting_loop_is_learned_and_followed(self) -> None:
        """Each of the gateway's passes takes 15 to 18 s (it sleeps 15 s, then looks at every
        task): no fixed grid fits its looks for long. The mean period is learned from the gaps
        between dated looks, and a poll aimed at the look after the latest dated one goes
        after it, within a few seconds."""
        rng = random.Random(9)
        looks, at, seen = Looks(5.0, 60.0), 4.0, []
        for _ in range(80):
            at += 15 + rng.uniform(0, 3)
            seen.append(at)
        late, gaps = [], []
        for i, look in enumerate(seen[:-1]):
            looks.saw(look, 0.001)
            if looks.period is None:
                continue
            nxt = seen[i + 1]
            poll = looks.poll_at(nxt - 2, look + 1)  # wanted shortly before the next look
            late.append(poll - nxt)
            gaps.append(looks.period)
        assert len(late) > 50
        assert looks.period == pytest.approx(16.5, abs=0.5)
        assert sum(x < 0 for x in late) <= 0.05 * len(late)  # before the look: a wasted poll
        assert sum(late) / len(late) < 3.5 and max(late) < 6.0

    @pytest.mark.parametrize(("dated", "jitter"), [(0.75, 3.0), (0.25, 3.0), (0.75, 0.0)])
    def test_the_drift_is_learned_from_whole_second_dates(self, dated: float,
                                                          jitter: float) -> None:
        """Passes of 15 to 15 + J s stray by J/√12 each (0.87 s at J = 3). Dates to the whole
        second, moved onto the run's clock by a create time also to the second, add a second
        or so to each gap between two dated looks, however many passes it spans. With long
        renders few looks date an end (a quarter of them here): most gaps span several passes.
        Taking that imprecision off per pass, as before, left the drift learned at 0.52 s
        (median of 200 runs; a tenth of them under 0.08 s, margins too thin, polls before
        their look); per gap, it is near the truth. An exact loop still learns none."""
        learned = []
        for seed in range(200):
            rng, looks, at = random.Random(seed), Looks(5.0, 60.0), 1000.0
            while looks.period is None and at < 6000:
                at += 15 + jitter * rng.random()
                if rng.random() < dated:
                    created = at - rng.uniform(60, 200)
                    looks.saw(math.floor(at) - math.floor(created) + created, 1.0)
            if looks.period is not None:
                learned.append(looks._drift)
        assert len(learned) > 150
        truth = jitter / math.sqrt(12)
        if truth == 0:
            assert statistics.median(learned) < 0.05
        else:
            assert 0.8 * truth <= statistics.median(learned) <= 1.2 * truth
            assert sorted(learned)[len(learned) // 10] >= 0.3 * truth

    def test_a_poll_goes_just_after_a_look_it_has_not_seen(self) -> None:
        """Looks at 3, 18, 33, 48, 63 …: a poll wanted at 40 goes at 33 (+ slack: the same
        answer, sooner), or at 48 if the last poll showed the look at 33 already; one aimed at
        an end in [50, 60] goes after 63, the first look that can show it; in [47.5, 70], after
        48 it would be too unlikely (2 % against 25 % a poll is worth), so also after 63."""
        looks = Looks(5.0, 60.0)
        assert looks.poll_at(40.0, None) == 40.0  # no schedule yet: as the planner says
        looks.period, looks.phase, looks.slack = 15.0, 3.0, 0.5
        assert looks.poll_at(40.0, None) == 33.5
        assert looks.poll_at(40.0, 33.6) == 48.5
        assert looks.poll_at(0.0, None, (50.0, 60.0, 5.0)) == 63.5
        assert looks.poll_at(0.0, None, (47.5, 70.0, 5.0)) == 63.5
        assert looks.poll_at(0.0, None, (44.0, 56.0, 5.0)) == 48.5  # a third of it by 48


@pytest.mark.parametrize(("jitter", "after", "missed", "lag", "worst", "per_task"),
                         [(0.0, 4.0, 0, 13.0, 45.0, 3.0), (3.0, 13.0, 4, 15.0, 40.0, 3.0)])
async def test_a_lagging_gateway_is_polled_just_after_its_looks(
        tmp_path: Path, jitter: float, after: float, missed: int, lag: float, worst: float,
        per_task: float) -> None:
    """ImaRouter's gateway answers from its last look upstream, one loop every 15 s (or 15 to
    18 s, each pass taking its time: looks that drift), and dates ends by the look that saw
    them (whole seconds). Once the run has learned the loop from those dates, its polls go just
    after looks — none in the middle of an interval, where it would read what it could have
    read just after the look before — and each reading counts as of its look. Measured on the
    run's later half: polls at most 3 s after a look (before: anywhere, up to 15 s), tasks read
    finished 10 s after their end on average (before: 16–18 s; the worst, a render far shorter
    than the rest, 25–40 s), at about 2.2–2.6 polls each (before: 2.9–3.2). With the drift:
    polls at most 6–11 s after a look, 11.5–14.2 s after the end on average, 2.3–2.4 polls each
    (seeds 7–9; a fixed grid, before: up to 17 s, 16.6–18.4 s, 3.1–4.1 polls).

    A drifting loop's next look is known only to a margin of twice the drift learned, so now
    and then a look comes later than that and the poll aimed after it reads the one before
    (15–18 s after it). Over 12 seeds and repeats of seed 7 (about 75 polls each on the later
    half), a run had up to three polls 13 s or more after a look (the drift learned before
    session 10 did it too: one run of 12 seeds), and 2.2–2.8 polls per task: a few such polls
    are allowed, not polls anywhere in the interval (a fifth of them past 13 s)."""
    vs = VirtualSim({"BATCHKLING_TEST_KEY": TEST_KEY}, status_refresh_s=15.0,
                    status_refresh_jitter_s=jitter, render_median_s=120.0, render_sigma=0.3)
    path = vs.manifest(tmp_path, 60, limits={"max_in_flight": 10})
    summary = await vs.run(path, tmp_path / "jobs")
    assert summary.exit_code == 0
    later = {t["task_id"]: t for t in vs.sim.task_table()[30:]}
    offset = vs.clock.monotonic() - vs.sim.sim_now()
    since_look, polls = [], 0
    for at, method, url, _status in vs.requests.entries:
        task_id = url.rsplit("/", 1)[-1]
        if method == "GET" and task_id in later:
            sim_at = at - offset
            since_look.append(sim_at - vs.sim.looked(sim_at))
            polls += 1
    assert sum(s >= after for s in since_look) <= missed, sorted(since_look)[-5:]
    lags = [t["seen_done_at"] - t["ends_at"] for t in later.values()]
    assert sum(lags) / len(lags) <= lag, sorted(lags)
    assert max(lags) <= worst, sorted(lags)
    assert polls / len(later) <= per_task


async def _first_kling_run(folder: Path, n: int, median: float) -> VirtualSim:
    """A first Kling run of ``n`` jobs (no render times anywhere yet, no callbacks), all in
    flight at once; every task must be seen finished within half its age of its end."""
    env = {"KLING_ACCESS_KEY": DEFAULT_ACCESS_KEY, "KLING_SECRET_KEY": DEFAULT_SECRET_KEY}
    vs = VirtualSim(env, render_median_s=median, render_sigma=0.2)
    path = vs.manifest(folder, n, provider="kling", limits={"max_in_flight": n})
    summary = await vs.run(path, folder / "jobs")
    assert summary.exit_code == 0
    tasks = vs.sim.task_table()
    assert len(tasks) == n
    for t in tasks:
        age = t["ends_at"] - t["created_at"]
        lag = t["seen_done_at"] - t["ends_at"]
        assert lag <= 0.5 * age + 1.0, (t["task_id"], age, lag)
    return vs


class TestPriorFromTheStore:
    async def test_render_times_of_the_group_on_this_endpoint(self, store_url: str) -> None:
        """Store.render_times (both backends): finished tasks of one model, duration and mode
        on one provider and base URL, newest first, at most ``limit``; other groups and
        endpoints excluded."""
        store = store_from(store_url)
        await store.open()
        for run_id, base_url in (("a", "https://api.example"), ("b", "https://api.example"),
                                 ("sim", "http://127.0.0.1:1234")):
            await store.save_run(run_id, manifest_path=None, manifest_text=None,
                                 config_json="{}", provider="imarouter", base_url=base_url,
                                 simulated=False, now=2.0 if run_id == "b" else 1.0)
            specs = [JobSpec(job_id=f"j{i}", model="kling-v2-6", prompt="p", duration=d,
                             size="16:9", mode=m)
                     for i, (d, m) in enumerate([(5, "std"), (5, "std"), (10, "std"),
                                                 (5, "pro"), (5, "std")])]
            await store.sync_jobs(run_id, added=list(enumerate(specs)), changed=[],
                                  reordered=[], removed=[], now=1.0)
            for i in range(4):
                ended = 100.0 + i + (10 if run_id == "b" else 0)
                await store.transition(run_id, f"j{i}", JobState.DOWNLOADED, now=ended,
                                       event="e", completed_at=ended,
                                       render_seconds=float(i + 1) * (2 if run_id == "b" else 1))
        times = await store.render_times(provider="imarouter", base_url="https://api.example",
                                         model="kling-v2-6", duration=5, mode="std")
        # j0 and j1 of each run (j2 is 10 s, j3 pro, j4 unfinished); run b first (newer).
        assert sorted(times[:2]) == [2.0, 4.0] and sorted(times[2:]) == [1.0, 2.0]
        assert await store.render_times(provider="imarouter", base_url="https://api.example",
                                        model="kling-v2-6", duration=5, mode="std",
                                        limit=1) == [4.0]
        assert await store.render_times(provider="kling", base_url="https://api.example",
                                        model="kling-v2-6", duration=5, mode="std") == []
        await store.aclose()

    async def test_a_second_run_is_not_blind(self, tmp_path: Path) -> None:
        """After a run on the same endpoint, the next run's first tasks are first polled where
        a tenth of the earlier tasks had finished (a minute in), not at the blind floor (5 s)."""
        vs = VirtualSim({"BATCHKLING_TEST_KEY": TEST_KEY}, render_sigma=0.2)
        first = vs.manifest(tmp_path, 10, limits={"max_in_flight": 5})
        summary = await vs.run(first, tmp_path / "jobs")
        assert summary.exit_code == 0
        done = len(vs.requests.entries)
        second = write_manifest(tmp_path, [{"id": f"n{i}", "prompt": f"new {i}"}
                                           for i in range(5)],
                                name="second", base_url=vs.base_url, filename="second.yaml",
                                limits={"max_in_flight": 5, "submit_rate": 50})
        summary = await vs.run(second, tmp_path / "jobs")
        assert summary.exit_code == 0
        offset = vs.clock.monotonic() - vs.sim.sim_now()  # request times are on the clock
        created = {t["task_id"]: t["created_at"] + offset for t in vs.sim.task_table()[10:]}
        first_polls: dict[str, float] = {}
        for at, method, path, _status in vs.requests.entries[done:]:
            task_id = path.rsplit("/", 1)[-1]
            if method == "GET" and task_id in created:
                first_polls.setdefault(task_id, at - created[task_id])
        assert len(first_polls) == 5
        assert min(first_polls.values()) > 40, first_polls

    async def test_a_first_kling_run_is_not_left_to_the_ceiling(self, tmp_path: Path) -> None:
        """Kling's first run on an endpoint (no render times anywhere yet, no callbacks): its
        first tasks are looked at on the blind schedule (5 s, then ×1.5), so each is seen
        finished within half its age of its end — not at the 120 s ceiling, which is where
        the list loop, with nothing to predict from, left them."""
        await _first_kling_run(tmp_path, 5, 20.0)

    async def test_a_first_kling_run_looks_at_its_first_tasks_by_list(
            self, tmp_path: Path) -> None:
        """Nothing predicts the first tasks' ends on a first Kling run, so they are looked at
        blind — by one list for all of them, not one poll each: ten tasks rendering about a
        minute cost at most 2.5 lists each (the first wave's blind ones included), and no
        poll of a single task (before: seven each, at 5 s and then ×1.5)."""
        vs = await _first_kling_run(tmp_path, 10, 60.0)
        ids = {t["task_id"] for t in vs.sim.task_table()}
        reads = [p for _at, m, p, _s in vs.requests.entries if m == "GET"
                 and p.startswith("/v1/videos/") and not p.startswith("/v1/videos/download")]
        single = [p for p in reads if p.rsplit("/", 1)[-1] in ids]
        lists = [p for p in reads if p.rsplit("/", 1)[-1] not in ids]
        assert single == []
        assert len(lists) <= 25, len(lists)


class _Lister:
    """A provider that can list (its answers are not asked for here)."""

    can_list = True

    def list_kind(self, spec: JobSpec) -> str:
        return "text2video"

    async def status(self, task_id: str, spec: JobSpec) -> None:
        raise AssertionError("no poll expected")


class TestListTiming:
    async def test_with_nothing_left_to_create_the_list_waits_for_the_last_end(self) -> None:
        """While jobs wait for a slot, a list goes once about half a task's end is expected
        among the tasks in flight. With nothing left to create, a seen end frees no slot
        anybody waits for: the list waits until all have likely ended, or a quarter of them
        (so that their downloads are not all left to the end)."""
        planner = _planner()
        _learned(planner, median=90.0)
        watch = Watch(_Lister(), SystemClock(), planner, floor=0.5)  # type: ignore[arg-type]
        spec = cast(JobSpec, None)
        listed = [watch.add(f"t{i}", spec, planner.plan("g"), -10.0 * i) for i in range(8)]
        busy = watch._due(listed, 0.0)
        watch.draining = True
        tail = watch._due(listed, 0.0)
        assert tail > busy + 10

        def chances(at: float) -> list[float]:
            return [e.plan.done_by(at - e.mono_start) for e in listed]

        assert sum(chances(busy)) == pytest.approx(LIST_THRESHOLD, abs=0.01)
        ended = chances(tail)
        assert sum(ended) >= TAIL_BATCH * len(listed) - 0.01 or math.prod(ended) >= 0.39
        assert sum(chances(tail - 1.0)) < TAIL_BATCH * len(listed)

    async def test_when_lists_fail_the_tasks_poll_on_their_own(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A first Kling run whose list requests all fail: after two failed lists each task
        is polled on its own blind schedule at once — not left to its late safety net, which
        for a blind task is minutes away."""
        async def down(self: KlingProvider, kind: str, size: int) -> None:
            raise ProviderError("list endpoint down (test)")

        monkeypatch.setattr(KlingProvider, "list_recent", down)
        await _first_kling_run(tmp_path, 5, 60.0)
