"""Simulator settings: defaults, profiles, loading from files, runtime changes, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sim_helpers import Sim

from batchkling.errors import BatchklingError
from batchkling.simulator import PROFILES, SimConfig, load_faults

pytestmark = pytest.mark.timeout(30)


class TestSimConfig:
    def test_defaults_are_fault_free(self) -> None:
        """The default config has no faults, no limits and no quirks."""
        cfg = SimConfig()
        for name, value in cfg.as_dict().items():
            if name.endswith("_rate") or name.startswith("quirk_"):
                assert not value, name
        assert cfg.slot_limit is None and cfg.rate_limit_per_s is None
        assert (cfg.access_key, cfg.secret_key) == ("sim-access-key", "sim-secret-key")

    def test_replace_coerces_and_checks(self) -> None:
        """replace() turns ints into floats and lists into tuples, and rejects bad values."""
        cfg = SimConfig().replace(speed=60, fail_reasons=["internal"])
        assert cfg.speed == 60.0 and isinstance(cfg.speed, float)
        assert cfg.fail_reasons == ("internal",)
        with pytest.raises(ValueError, match="fraction"):
            SimConfig().replace(poll_5xx_rate=1.5)
        with pytest.raises(ValueError, match="unknown simulator setting"):
            SimConfig().replace(nope=1)
        with pytest.raises(ValueError, match="must be bool"):
            SimConfig().replace(callbacks="yes")
        with pytest.raises(ValueError, match="fail_reasons"):
            SimConfig().replace(fail_reasons=["meteor"])

    def test_frozen(self) -> None:
        """A SimConfig is an immutable value."""
        with pytest.raises(AttributeError):
            SimConfig().speed = 2.0  # type: ignore[misc]  # asserting that assignment fails


class TestProfiles:
    def test_named_profiles(self) -> None:
        """The six documented profiles exist and all load."""
        assert set(PROFILES) == {"none", "quirks", "flaky", "slots", "overpriced", "chaos"}
        for name in PROFILES:
            assert isinstance(load_faults(name), SimConfig)

    def test_profile_contents(self) -> None:
        """quirks turns every quirk on, slots limits to 3, chaos mixes faults and quirks."""
        quirks = load_faults("quirks")
        assert all(v for k, v in quirks.as_dict().items() if k.startswith("quirk_"))
        assert load_faults("slots").slot_limit == 3
        chaos = load_faults("chaos")
        assert chaos.poll_drop_rate > 0 and chaos.quirk_wrapped and chaos.never_finish_rate > 0
        flaky = load_faults("flaky")
        assert flaky.rate_limit_per_s and flaky.url_ttl_s and flaky.download_truncate_rate

    def test_overrides_skip_none(self) -> None:
        """Overrides apply over the profile; None leaves the profile's value."""
        cfg = load_faults("slots", speed=30, api_key=None, slot_limit=None)
        assert cfg.speed == 30.0 and cfg.slot_limit == 3


class TestLoadFaults:
    def test_yaml_file(self, tmp_path: Path) -> None:
        """A YAML file of fields is loaded; `profile:` names a base profile."""
        path = tmp_path / "faults.yaml"
        path.write_text("profile: slots\npoll_5xx_rate: 0.25\nfail_reasons: [internal]\n")
        cfg = load_faults(str(path))
        assert cfg.slot_limit == 3 and cfg.poll_5xx_rate == 0.25
        assert cfg.fail_reasons == ("internal",)

    def test_json_file(self, tmp_path: Path) -> None:
        """A JSON file of fields is loaded."""
        path = tmp_path / "faults.json"
        path.write_text(json.dumps({"slot_limit": 7, "url_ttl_s": 5}))
        assert load_faults(str(path)).slot_limit == 7

    def test_unknown_name(self) -> None:
        """An unknown profile name is one clear line listing the valid names."""
        with pytest.raises(BatchklingError) as info:
            load_faults("chaotic")
        message = str(info.value)
        assert "\n" not in message and "chaotic" in message
        assert all(name in message for name in PROFILES)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("slot_limit: [1", "cannot read"),
            ("- 1\n- 2\n", "mapping"),
            ("slot_lmit: 3\n", "slot_lmit"),
            ("speed: fast\n", "speed must be float"),
            ("profile: nope\n", "unknown profile"),
        ],
    )
    def test_bad_file(self, tmp_path: Path, text: str, expected: str) -> None:
        """A bad file raises BatchklingError naming the file and the problem."""
        path = tmp_path / "faults.yaml"
        path.write_text(text)
        with pytest.raises(BatchklingError, match=expected) as info:
            load_faults(str(path))
        assert str(path) in str(info.value) and "\n" not in str(info.value)


class TestRuntimeConfig:
    async def test_post_updates_running_config(self) -> None:
        """POST /_sim/config changes the live settings and answers the new config."""
        async with Sim() as sim:
            r = await sim.client.post("/_sim/config", json={"slot_limit": 1, "poll_5xx_rate": 1})
            assert r.status_code == 200 and r.json()["slot_limit"] == 1
            assert sim.state.config.poll_5xx_rate == 1.0
            assert (await sim.client.get("/_sim/config")).json()["slot_limit"] == 1
            r = await sim.ima_create()
            assert r.status_code == 200
            assert (await sim.ima_create()).status_code == 429
            assert (await sim.ima_get(r.json()["task_id"])).status_code in (500, 503)
            await sim.client.post("/_sim/config", json={"poll_5xx_rate": 0})
            assert (await sim.ima_get(r.json()["task_id"])).status_code == 200

    async def test_rejects_unknown_and_bad(self) -> None:
        """Unknown fields, bad values and non-objects answer 400 and change nothing."""
        async with Sim() as sim:
            for body in ({"slots": 3}, {"fail_rate": 2}, [1, 2]):
                r = await sim.client.post("/_sim/config", json=body)
                assert r.status_code == 400 and r.json()["error"]
            r = await sim.client.post("/_sim/config", content=b"{nope")
            assert r.status_code == 400
            assert sim.state.config == SimConfig()

    async def test_speed_change_keeps_time_continuous(self) -> None:
        """Changing speed at runtime neither rewinds nor jumps simulated time."""
        async with Sim() as sim:
            sim.advance(10)
            before = sim.state.sim_now()
            sim.state.update_config(speed=10)
            assert sim.state.sim_now() == pytest.approx(before)
            sim.advance(1)
            assert sim.state.sim_now() == pytest.approx(before + 10)


async def _run_scenario(seed: int, extra_polls: int = 0) -> tuple[list[object], list[int]]:
    """Create tasks and poll them with faults on; returns task table rows and poll statuses."""
    async with Sim(seed=seed, fail_rate=0.3, poll_5xx_rate=0.3, create_5xx_rate=0.2) as sim:
        ids = []
        for i in range(12):
            r = await sim.ima_create(prompt=f"shot {i}")
            if r.status_code == 200:
                ids.append(r.json()["task_id"])
            for _ in range(extra_polls):
                if ids:
                    await sim.ima_get(ids[0])
        sim.advance(5000)
        statuses = [(await sim.ima_get(t)).status_code for t in ids]
        # Ids are unique to each simulator (a restarted one must not reuse them); the rest of
        # the story is the seed's.
        rows = [(t["key"], t["render_seconds"], t["outcome"]) for t in sim.state.task_table()]
        return list(rows), statuses


class TestDeterminism:
    async def test_same_seed_same_story(self) -> None:
        """The same seed and request order give the same render times, outcomes, faults."""
        assert await _run_scenario(7) == await _run_scenario(7)

    async def test_other_seed_other_story(self) -> None:
        """A different seed draws differently."""
        assert (await _run_scenario(7))[0] != (await _run_scenario(8))[0]

    async def test_polls_do_not_shift_task_draws(self) -> None:
        """Extra polls between creates leave every task's render time and outcome unchanged."""
        plain, _ = await _run_scenario(3)
        polled, _ = await _run_scenario(3, extra_polls=3)
        assert plain == polled
