"""The simulated account: tasks, slots, rate limit, credit, seeded fault draws and counters.

A task's whole life is decided when it is created (queue time, render time, outcome), so its
status is a pure function of the clock: nothing runs per task, and 10,000 live tasks cost a dict
and a heap. Slots are released lazily by popping the heap of end times on each request.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import logging
import math
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchkling.errors import ConfigError
from batchkling.simulator.catalog import Spec, known_models, price_usd, sim_tags, units
from batchkling.simulator.config import SimConfig

_log = logging.getLogger("batchkling.simulator")
QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
STATES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED)
SUCCEED, NEVER = "succeed", "never"


@dataclass(slots=True)
class Task:
    """One simulated render. Mutable only in its observation flags."""

    n: int
    task_id: str
    shape: str  # "imarouter" | "kling"
    spec: Spec
    key: str | None  # the idempotency key or external_task_id it was created under
    external_task_id: str | None
    callback_url: str | None
    created_sim: float
    created_wall: float
    started_sim: float  # leaves `queued`
    render_s: float
    ends_sim: float  # math.inf for a task that never finishes
    outcome: str  # SUCCEED | NEVER | a FAIL_KINDS entry
    pick: int  # per-task draw for cosmetic choices (status synonyms, reason field)
    completion_seen: bool = False
    last_callback: str | None = None
    account: str | None = None  # the account (of `account_slots`) whose slot it holds
    seen_done_sim: float | None = None  # when a client first read its terminal status


@dataclass(frozen=True, slots=True)
class CreateFaults:
    """What goes wrong with one create request; drawn before we know whether it is admitted."""

    status_before: int | None  # answer this 5xx and create nothing
    status_after: int | None  # create the task, then answer this 5xx
    hang: bool  # create the task, then hold the answer for hang_s real seconds


@dataclass(slots=True)
class _Counters:
    create_requests: int = 0
    creates: int = 0
    polls: int = 0
    lists: int = 0  # Kling list requests (each reports many tasks)
    downloads: int = 0
    callbacks_sent: int = 0
    callbacks_failed: int = 0
    creates_without_key: int = 0
    replays: int = 0  # creates answered with an existing task (idempotency key seen before)
    creates_by_key: Counter[str] = field(default_factory=Counter)
    create_requests_by_key: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    # Images of valid creates by the form they came in: "url", "data_uri" or "base64".
    image_forms: Counter[str] = field(default_factory=Counter)


class SimState:
    """The mutable heart of the simulator, owned by one event loop (``app.state.sim``)."""

    def __init__(self, config: SimConfig, clock: Callable[[], float] | None = None, *,
                 journal: Path | None = None) -> None:
        self._clock = clock or time.monotonic
        self.config = config
        # Task ids are unique to this instance (like a real provider's), so a simulator started
        # again with the same seed never hands out an id an earlier one gave a client.
        self.instance = secrets.token_hex(4)
        self.journal = journal
        c = self._clock()
        self._c0, self._sim0, self._wall0 = c, 0.0, time.time()
        self.tasks: dict[str, Task] = {}
        self.by_idem: dict[str, Task] = {}
        self.by_external: dict[str, Task] = {}
        self._ends: list[tuple[float, int]] = []
        # Accounts of their own (config.account_slots): slots held and the peak, per account.
        self.account_limits = {account_label(key): int(n) for key, _, n in
                               (e.rpartition("=") for e in config.account_slots)}
        self.account_slots: Counter[str] = Counter()
        self.account_peaks: Counter[str] = Counter()
        self._task_accounts: dict[int, str] = {}
        self.slots_in_use = 0
        self.peak_slots = 0
        self.counters = _Counters()
        self._request_ids = 0
        self.jwt_cache: dict[tuple[str, str, str], dict[str, Any]] = {}
        # Tasks with a callback_url whose terminal status has not been POSTed yet, with the
        # origin their creator used (result URLs in callbacks must point where it can reach).
        self.callback_pending: dict[str, tuple[Task, str]] = {}
        self.callback_inbox: list[Any] = []  # what /_sim/callback-sink received
        self.image_urls: deque[str] = deque(maxlen=1000)  # image URLs valid creates carried
        self.extra_models = config.model_prices
        self.callback_poke: Callable[[], None] | None = None  # wakes the delivery loop
        self._seed_streams()
        self._tokens, self._tokens_at = 0.0, c
        self._reset_bucket()
        self.restored = self._restore() if journal is not None else 0

    # -- time ---------------------------------------------------------------------------------

    def sim_now(self) -> float:
        """Simulated seconds since start: the clock scaled by ``speed``."""
        return self._sim0 + (self._clock() - self._c0) * self.config.speed

    def wall_now(self) -> float:
        """Epoch seconds as the clients see them: real time, not scaled, but driven by the clock."""
        return self._wall0 + (self._clock() - self._c0)

    def sim_to_wall(self, t: float) -> float:
        """The epoch time at which sim time ``t`` happens (or happened) at the current speed."""
        return self._wall0 + (t - self._sim0) / self.config.speed

    def wall_to_sim(self, t: float) -> float:
        """The sim time of epoch time ``t`` (past or future): ``sim_to_wall`` inverted."""
        return self._sim0 + (t - self._wall0) * self.config.speed

    def update_config(self, **changes: Any) -> SimConfig:
        """Apply runtime changes; raises ValueError for unknown fields or bad values."""
        new = self.config.replace(**changes)
        c = self._clock()
        # Rebase so that simulated and wall time stay continuous across a speed change.
        elapsed = c - self._c0
        self._sim0 += elapsed * self.config.speed
        self._wall0 += elapsed
        self._c0 = c
        old, self.config = self.config, new
        self.extra_models = new.model_prices
        if new.seed != old.seed:
            self._seed_streams()
        if (new.rate_limit_per_s, new.retry_after_s) != (old.rate_limit_per_s, old.retry_after_s):
            self._reset_bucket()
        return new

    # -- money --------------------------------------------------------------------------------

    @property
    def models(self) -> tuple[str, ...]:
        """The model ids this simulator accepts."""
        return known_models(self.extra_models)

    def charge_usd(self, spec: Spec) -> float:
        """What one finished task of ``spec`` costs (ImaRouter's ``amount_usd``)."""
        return price_usd(spec, factor=self.config.price_factor, extra=self.extra_models)

    def charge_units(self, spec: Spec) -> str:
        """What one finished task of ``spec`` deducts (Kling's ``final_unit_deduction``)."""
        return units(spec, factor=self.config.price_factor)

    # -- seeded draws -------------------------------------------------------------------------

    def _seed_streams(self) -> None:
        # Separate streams so that, e.g., the number of polls never shifts render times.
        seed = self.config.seed
        self._create_rng = random.Random(f"{seed}:create")
        self._poll_rng = random.Random(f"{seed}:poll")
        self._download_rng = random.Random(f"{seed}:download")
        self._look_rng = random.Random(f"{seed}:gateway")
        self._look_share = self._look_rng.random()  # of status_refresh_s: the first look
        self._looks: list[float] = []  # the gateway's looks so far, in sim time, ascending
        self.url_secret = hashlib.sha256(f"{seed}:url-signing".encode()).digest()

    def draw_create_faults(self) -> CreateFaults:
        """Three draws per create request, always, so toggling one rate shifts no other."""
        cfg, r = self.config, self._create_rng
        u_before, u_after, u_hang, u_code = r.random(), r.random(), r.random(), r.random()
        status = 503 if u_code < 0.3 else 500
        return CreateFaults(
            status_before=status if u_before < cfg.create_5xx_rate else None,
            status_after=status if u_after < cfg.create_5xx_after_create_rate else None,
            hang=u_hang < cfg.create_hang_after_create_rate,
        )

    def draw_poll_fault(self) -> str | int | None:
        """None, an HTTP 5xx status, or "drop" for one status request."""
        cfg, r = self.config, self._poll_rng
        u_5xx, u_drop, u_code = r.random(), r.random(), r.random()
        if u_drop < cfg.poll_drop_rate:
            return "drop"
        if u_5xx < cfg.poll_5xx_rate:
            return 503 if u_code < 0.3 else 500
        return None

    def draw_truncate(self) -> bool:
        """Whether this download is cut short."""
        return self._download_rng.random() < self.config.download_truncate_rate

    # -- account checks -----------------------------------------------------------------------

    def _reset_bucket(self) -> None:
        rate = self.config.rate_limit_per_s
        self._tokens = max(1.0, rate) if rate else 0.0
        self._tokens_at = self._clock()

    def take_rate_token(self) -> bool:
        """Admit one create under ``rate_limit_per_s`` (a token bucket in real seconds)."""
        rate = self.config.rate_limit_per_s
        if rate is None:
            return True
        now = self._clock()
        self._tokens = min(max(1.0, rate), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def out_of_credit(self) -> bool:
        """True once ``credits_after_creates`` tasks exist."""
        limit = self.config.credits_after_creates
        return limit is not None and self.counters.creates >= limit

    def prune(self, now: float | None = None) -> None:
        """Release the slots of tasks whose end time has passed."""
        now = self.sim_now() if now is None else now
        ends = self._ends
        while ends and ends[0][0] <= now:
            _end, n = heapq.heappop(ends)
            account = self._task_accounts.pop(n, None)
            if account is None:
                self.slots_in_use -= 1
            else:
                self.account_slots[account] -= 1

    def account_of(self, key: str | None) -> str | None:
        """The account of its own that a bearer key names (``account_slots``), if any."""
        if key is None or not self.account_limits:
            return None
        label = account_label(key)
        return label if label in self.account_limits else None

    def slots_full(self, account: str | None = None) -> bool:
        """True when every slot of the account (the shared pool by default) is held."""
        self.prune()
        if account is not None:
            return self.account_slots[account] >= self.account_limits[account]
        limit = self.config.slot_limit
        return limit is not None and self.slots_in_use >= limit

    # -- counters -----------------------------------------------------------------------------

    def count_create_request(self, key: str | None) -> None:
        """Count a create request (admitted or not) under its key."""
        self.counters.create_requests += 1
        if key is not None:
            self.counters.create_requests_by_key[key] += 1

    def note_images(self, *values: Any) -> None:
        """Record the form of each image a valid create carried (URLs kept, the last 1,000),
        so tests can check what reached the provider."""
        for value in values:
            if not isinstance(value, str):
                continue
            if value.startswith(("http://", "https://")):
                self.counters.image_forms["url"] += 1
                self.image_urls.append(value)
            else:
                self.counters.image_forms["data_uri" if value.startswith("data:") else
                                          "base64"] += 1

    def reject(self, reason: str) -> None:
        """Count a refused request by reason."""
        self.counters.rejected[reason] += 1

    def next_request_id(self) -> str:
        """A fresh Kling-style request id."""
        self._request_ids += 1
        return f"sim-{self.config.seed:x}-{self._request_ids:08x}"

    # -- tasks --------------------------------------------------------------------------------

    def _task_id(self, shape: str, n: int) -> str:
        name = f"{self.config.seed}:{self.instance}:{n}"
        digest = hashlib.blake2b(name.encode(), digest_size=12).hexdigest()
        if shape == "kling":
            return "8" + str(int(digest, 16))[:17]
        return f"video_{digest}"

    def create_task(
        self,
        shape: str,
        spec: Spec,
        *,
        key: str | None,
        external_task_id: str | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        base: str = "",
        account: str | None = None,
    ) -> Task:
        """Create a task, draw its fate from its own seeded stream, and take a slot."""
        cfg, c = self.config, self.counters
        n = c.creates + 1
        r = random.Random(f"{cfg.seed}:task:{n}")
        u_queue, z, u_fail, u_kind, u_never = (r.random(), r.gauss(0.0, 1.0), r.random(),
                                               r.random(), r.random())
        pick = r.randrange(1 << 16)
        mult = (1.6 if spec.duration == 10 else 1.0) * (1.3 if spec.mode == "pro" else 1.0)
        render = cfg.render_median_s * mult * math.exp(cfg.render_sigma * z)
        outcome = SUCCEED
        if u_never < cfg.never_finish_rate:
            outcome = NEVER
        elif u_fail < cfg.fail_rate:
            outcome = cfg.fail_reasons[int(u_kind * len(cfg.fail_reasons))]
        tags = sim_tags(spec.prompt)
        if "render" in tags:
            render = float(tags["render"] or 0)
        if "never" in tags:
            outcome = NEVER
        elif "fail" in tags:
            outcome = tags["fail"] if tags["fail"] in cfg.fail_reasons else "internal"

        now = self.sim_now()
        started = now + cfg.queue_s * (0.5 + u_queue)
        if outcome == NEVER:
            ends = math.inf
        elif outcome == SUCCEED:
            ends = started + render
        else:  # moderation fails early, internal errors late
            ends = started + render * (0.2 if outcome == "content_policy" else 0.6)
        task = Task(n, self._task_id(shape, n), shape, spec, key, external_task_id, callback_url,
                    now, self.wall_now(), started, render, ends, outcome, pick, account=account)
        c.creates = n
        if key is None:
            c.creates_without_key += 1
        else:
            c.creates_by_key[key] += 1
        self._add(task, idempotency_key, now)
        if callback_url:
            self.callback_pending[task.task_id] = (task, base)
            if self.callback_poke is not None:
                self.callback_poke()
        if self.journal is not None:
            self._record(task, idempotency_key)
        return task

    def _add(self, task: Task, idempotency_key: str | None, now: float) -> None:
        self.tasks[task.task_id] = task
        if task.external_task_id is not None:
            self.by_external.setdefault(task.external_task_id, task)
        if idempotency_key is not None:
            self.by_idem.setdefault(idempotency_key, task)
        self.prune(now)
        if task.ends_sim > now:
            if task.account is None:
                self.slots_in_use += 1
                self.peak_slots = max(self.peak_slots, self.slots_in_use)
            else:
                self.account_slots[task.account] += 1
                self.account_peaks[task.account] = max(self.account_peaks[task.account],
                                                       self.account_slots[task.account])
                self._task_accounts[task.n] = task.account
            if math.isfinite(task.ends_sim):
                heapq.heappush(self._ends, (task.ends_sim, task.n))

    # -- the journal: tasks outlive the process ------------------------------------------------

    def _record(self, task: Task, idempotency_key: str | None) -> None:
        """Append the task to the journal, its times as epoch seconds (flushed, not fsynced)."""
        def wall(t: float) -> float | None:
            return self.sim_to_wall(t) if math.isfinite(t) else None

        line = {
            "task_id": task.task_id, "n": task.n, "shape": task.shape, "spec": asdict(task.spec),
            "key": task.key, "external_task_id": task.external_task_id,
            "idempotency_key": idempotency_key, "callback_url": task.callback_url,
            "created": wall(task.created_sim), "started": wall(task.started_sim),
            "ends": wall(task.ends_sim), "render_s": task.render_s, "outcome": task.outcome,
            "pick": task.pick, "created_wall": task.created_wall,
        }
        assert self.journal is not None
        try:
            with self.journal.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(line, separators=(",", ":")) + "\n")
        except OSError as exc:  # the task exists; only its survival of a restart is lost
            _log.warning("cannot write the tasks journal %s (%s); not keeping tasks any more",
                         self.journal, exc)
            self.journal = None

    def _restore(self) -> int:
        """Load the journal's tasks (at the current speed); a torn last line is skipped."""
        assert self.journal is not None
        try:
            text = self.journal.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):
                with self.journal.open("a", encoding="utf-8") as fh:
                    fh.write("\n")  # the next task must not be glued to a torn line
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the simulator's tasks journal {self.journal} ({exc}); "
                              "delete it to start the simulated account afresh") from exc
        lines = text.splitlines()
        now = self.sim_now()

        def sim(t: float | None) -> float:
            return math.inf if t is None else self.wall_to_sim(t)

        restored = 0
        for line in lines:
            try:
                d = json.loads(line)
                task = Task(d["n"], d["task_id"], d["shape"], Spec(**d["spec"]), d["key"],
                            d["external_task_id"], d["callback_url"], sim(d["created"]),
                            d["created_wall"], sim(d["started"]), d["render_s"], sim(d["ends"]),
                            d["outcome"], d["pick"])
                idempotency_key = d["idempotency_key"]
            except (ValueError, KeyError, TypeError):
                continue
            self._add(task, idempotency_key, now)
            restored += 1
        return restored

    def observed(self, task: Task, now: float, shown: float | None = None) -> None:
        """A client read the task's status at ``now``, as it was at ``shown`` (the gateway's
        last refresh): note when it first read it ended."""
        if task.seen_done_sim is None and (now if shown is None else shown) >= task.ends_sim:
            task.seen_done_sim = now

    def refreshed(self, task: Task, now: float) -> float:
        """The sim time as of which a status poll at ``now`` shows the task: the gateway's
        latest look (:meth:`looked`), never before the create; ``now`` when the gateway does
        not lag."""
        return max(self.looked(now), task.created_sim)

    def looked(self, now: float) -> float:
        """The gateway's latest look at its upstream by sim time ``now``. One loop for every
        task, as the open-source gateway ImaRouter's answers match runs it (sleep, then look
        at all unfinished tasks): ``status_refresh_s`` apart plus up to
        ``status_refresh_jitter_s`` each, from a first look drawn from the seed; ``now``
        itself when the gateway does not lag."""
        if self.config.status_refresh_s <= 0:
            return now
        looks = self._looks_until(now)
        return looks[bisect.bisect_right(looks, now) - 1]

    def gateway_saw(self, t: float) -> float:
        """The first look of the gateway at or after sim time ``t``: when it records an end
        (its ``completed_at``); ``t`` itself when the gateway does not lag."""
        if self.config.status_refresh_s <= 0:
            return t
        looks = self._looks_until(t)
        return looks[bisect.bisect_left(looks, t)]

    def _looks_until(self, t: float) -> list[float]:
        """The looks so far, drawn on demand from the seed up to the first at or after ``t``
        (the same looks whatever the order of the questions; one before ``t`` always)."""
        every, jitter = self.config.status_refresh_s, self.config.status_refresh_jitter_s
        looks = self._looks
        if not looks:
            first = self._look_share * every
            looks.extend((first - every - jitter, first))  # a look before any task exists
        while looks[-1] < t:
            looks.append(looks[-1] + every + jitter * self._look_rng.random())
        return looks

    @staticmethod
    def status(task: Task, now: float) -> str:
        """The task's state at sim time ``now``."""
        if now < task.started_sim:
            return QUEUED
        if now < task.ends_sim:
            return IN_PROGRESS
        return COMPLETED if task.outcome == SUCCEED else FAILED

    @staticmethod
    def progress(task: Task, now: float) -> int:
        """Percent done: 0 while queued, 1..99 while rendering, 100 when completed."""
        if now < task.started_sim:
            return 0
        if now >= task.ends_sim and task.outcome == SUCCEED:
            return 100
        done = (min(now, task.ends_sim) - task.started_sim) / task.render_s if task.render_s else 1
        return max(1, min(99, int(done * 100)))

    def status_changed_at(self, task: Task, now: float) -> float:
        """Sim time of the task's latest status change."""
        if now >= task.ends_sim:
            return task.ends_sim
        return task.started_sim if now >= task.started_sim else task.created_sim

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks; the same dict ``GET /_sim/stats`` returns."""
        now = self.sim_now()
        self.prune(now)
        by_state = dict.fromkeys(STATES, 0)
        for task in self.tasks.values():
            by_state[self.status(task, now)] += 1
        c = self.counters
        return {
            "creates": c.creates,
            "create_requests": c.create_requests,
            "creates_by_key": dict(c.creates_by_key),
            "create_requests_by_key": dict(c.create_requests_by_key),
            "creates_without_key": c.creates_without_key,
            "replays": c.replays,
            "duplicate_keys": sorted(k for k, v in c.creates_by_key.items() if v > 1),
            "tasks_by_state": by_state,
            "polls": c.polls,
            "lists": c.lists,
            "downloads": c.downloads,
            "slots_in_use": self.slots_in_use,
            "peak_slots": self.peak_slots,
            "peak_slots_by_account": dict(self.account_peaks),
            "slot_limit": self.config.slot_limit,
            "rejected": dict(c.rejected),
            "image_forms": dict(c.image_forms),
            "image_urls": list(self.image_urls),
            "callbacks_sent": c.callbacks_sent,
            "callbacks_failed": c.callbacks_failed,
            "sim_time": round(now, 3),
            "speed": self.config.speed,
        }

    def task_table(self) -> list[dict[str, Any]]:
        """Every task with its drawn timings, in sim seconds, in creation order."""
        now = self.sim_now()
        return [
            {
                "task_id": t.task_id,
                "key": t.key,
                "shape": t.shape,
                "kind": t.spec.kind,
                "model": t.spec.model,
                "duration": t.spec.duration,
                "mode": t.spec.mode,
                "size": t.spec.size,
                "created_at": round(t.created_sim, 6),
                "created_wall": round(t.created_wall, 6),
                "started_at": round(t.started_sim, 6),
                "render_seconds": round(t.render_s, 6),
                "ends_at": round(t.ends_sim, 6) if math.isfinite(t.ends_sim) else None,
                "outcome": t.outcome,
                "status": self.status(t, now),
                "seen_done_at": None if t.seen_done_sim is None else round(t.seen_done_sim, 6),
            }
            for t in self.tasks.values()
        ]


def account_label(key: str) -> str:
    """How stats name an account of ``account_slots``: never the key itself."""
    return "acct-" + hashlib.sha256(key.encode()).hexdigest()[:8]
