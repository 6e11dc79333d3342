"""Loading valid manifests: models, defaults, provider settings, RunConfig snapshots, the schema."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from batchkling.cli import cli
from batchkling.errors import ManifestError
from batchkling.manifest.document import Manifest, RunConfig, load_manifest, manifest_json_schema

ROOT = Path(__file__).parent.parent
SAMPLES = sorted((ROOT / "sample_manifests").glob("*.yaml"))
SCHEMA_FILE = ROOT / "batchkling.schema.json"


def write(tmp_path: Path, body: str, name: str = "m.yaml") -> Path:
    """Write a manifest (dedented) and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def problems(path: Path) -> list[str]:
    """The problem lines a manifest produces (empty when it loads)."""
    try:
        load_manifest(path)
    except ManifestError as exc:
        return [str(p) for p in exc.problems]
    return []


class TestDefaults:
    def test_built_in_defaults_fill_unset_fields(self, tmp_path: Path) -> None:
        """A bare job gets model kling-v2-6, 5 s, 16:9, std."""
        m = load_manifest(write(tmp_path, "version: 1\nname: a\njobs: [{id: j, prompt: hi}]\n"))
        spec = m.specs[0]
        assert (spec.model, spec.duration, spec.size, spec.mode) == ("kling-v2-6", 5, "16:9", "std")
        assert spec.group is None and spec.variables == {}

    def test_defaults_block_then_job_override(self, tmp_path: Path) -> None:
        """``defaults`` apply to every job; a job's own value wins."""
        path = write(tmp_path, """\
            version: 1
            name: a
            defaults: {size: "9:16", mode: pro, negative_prompt: blurry}
            jobs:
              - {id: one, prompt: hi}
              - {id: two, prompt: hi, size: "1:1"}
            """)
        one, two = load_manifest(path).specs
        assert (one.size, one.mode, one.negative_prompt) == ("9:16", "pro", "blurry")
        assert two.size == "1:1"

    def test_limits_and_durations(self, tmp_path: Path) -> None:
        """task_timeout accepts 45m, 90s, 2h, 1h30m or seconds and stores seconds."""
        for text, seconds in (("45m", 2700), ("90s", 90), ("2h", 7200), ("1h30m", 5400),
                              ("600", 600), ("12.5", 12.5)):
            path = write(tmp_path, f"version: 1\nname: a\nlimits: {{task_timeout: {text}}}\n"
                                   "jobs: [{id: j, prompt: hi}]\n")
            assert load_manifest(path).limits.task_timeout == seconds

    def test_yaml_12_scalars(self, tmp_path: Path) -> None:
        """Unquoted 16:9 stays a string and ``sound: on`` means on (YAML 1.2, not 1.1)."""
        path = write(tmp_path, "version: 1\nname: a\njobs: [{id: j, prompt: hi, size: 16:9, "
                               "sound: on}]\n")
        spec = load_manifest(path).specs[0]
        assert (spec.size, spec.sound) == ("16:9", "on")

    def test_master_model_mode_is_a_warning_and_dropped(self, tmp_path: Path) -> None:
        """mode on a *-master model is returned as a warning and left out of the job."""
        path = write(tmp_path, "version: 1\nname: a\njobs:\n"
                               "  - {id: j, prompt: hi, model: kling-v2-master, mode: pro}\n")
        m = load_manifest(path)
        assert m.specs[0].mode is None
        assert len(m.warnings) == 1 and m.warnings[0].line == 4
        assert "ignored" in m.warnings[0].message

    def test_leading_zeros_lost_to_yaml_are_a_warning(self, tmp_path: Path) -> None:
        """An unquoted 007 is the number 7 in YAML 1.2: the job still loads, and a warning at
        the value says how to keep the zeros; quoted codes and plain 0 say nothing."""
        path = write(tmp_path, """\
            version: 1
            name: a
            matrices:
              - id: "sku-{sku}"
                prompt: "product {sku}"
                vars: {sku: [007, "008", 0, 12]}
            """)
        m = load_manifest(path)
        assert [s.job_id for s in m.specs] == ["sku-7", "sku-008", "sku-0", "sku-12"]
        assert [(w.line, w.column, w.path) for w in m.warnings] == [
            (6, 18, "matrices[0].vars.sku[0]")]
        assert "write '007' in quotes" in m.warnings[0].message

    def test_imarouter_warns_where_kling_would_refuse(self, tmp_path: Path) -> None:
        """Kling-native rules are warnings on imarouter (it passes the field through)."""
        path = write(tmp_path, "version: 1\nname: a\njobs:\n"
                               "  - {id: j, prompt: hi, model: kling-v2-6, cfg_scale: 0.5}\n")
        m = load_manifest(path)
        assert m.specs[0].cfg_scale == 0.5
        assert "cfg_scale" in m.warnings[0].message

    def test_urls_kept_paths_resolved(self, tmp_path: Path) -> None:
        """An https image stays a URL (not fetched); a relative path becomes absolute."""
        path = write(tmp_path, "version: 1\nname: a\njobs:\n"
                               "  - {id: j, prompt: hi, image: 'https://cdn.example.com/a.jpg'}\n")
        spec = load_manifest(path).specs[0]
        assert spec.image == "https://cdn.example.com/a.jpg" and spec.image_sha256 is None

    def test_no_jobs_is_a_problem(self, tmp_path: Path) -> None:
        """A manifest without jobs or matrices says so."""
        assert any("no jobs" in p for p in problems(write(tmp_path, "version: 1\nname: a\n")))


class TestProvider:
    def test_imarouter_defaults(self, tmp_path: Path) -> None:
        """imarouter defaults to its public base URL and IMAROUTER_API_KEY."""
        m = load_manifest(write(tmp_path, "version: 1\nname: a\njobs: [{id: j, prompt: hi}]\n"))
        assert m.provider.base_url == "https://api.imarouter.com"
        assert m.provider.api_key_env == "IMAROUTER_API_KEY"

    def test_kling_defaults(self, tmp_path: Path) -> None:
        """kling defaults to the Singapore endpoint and the KLING_ACCESS/SECRET_KEY pair."""
        path = write(tmp_path, "version: 1\nname: a\nprovider: {name: kling}\n"
                               "jobs: [{id: j, prompt: hi}]\n")
        p = load_manifest(path).provider
        assert p.base_url == "https://api-singapore.klingai.com"
        assert (p.access_key_env, p.secret_key_env, p.api_key_env) == (
            "KLING_ACCESS_KEY", "KLING_SECRET_KEY", None)

    @pytest.mark.parametrize(
        ("provider", "fragment"),
        [
            ("{name: kling, access_key_env: A}", "needs both"),
            ("{name: imarouter, secret_key_env: S}", "are for provider kling"),
            ("{name: kling, api_key_env: K, access_key_env: A, secret_key_env: S}", "not both"),
            ("{base_url: 'api.example.com'}", "http(s) URL"),
            ("{api_key_env: 'my key'}", "environment variable"),
            ("{api_key_env: eyJhbGciOiJIUzI1NiJ9}", "looks like a key"),
        ],
    )
    def test_bad_provider_settings(self, tmp_path: Path, provider: str, fragment: str) -> None:
        """Inconsistent credentials, bad URLs and pasted keys are refused with a reason."""
        path = write(tmp_path, f"version: 1\nname: a\nprovider: {provider}\n"
                               "jobs: [{id: j, prompt: hi}]\n")
        found = problems(path)
        assert len(found) == 1 and fragment in found[0], found


class TestRunConfig:
    def test_manifest_subclasses_runconfig(self) -> None:
        """The engine's RunConfig is the base class of Manifest."""
        assert issubclass(Manifest, RunConfig)

    @pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
    def test_run_config_round_trips_through_json(self, sample: Path) -> None:
        """run_config() snapshots to JSON and rehydrates to an equal RunConfig, no file needed."""
        config = load_manifest(sample).run_config()
        again = RunConfig.model_validate_json(config.model_dump_json())
        assert again == config

    def test_pricing_keys_are_checked(self, tmp_path: Path) -> None:
        """pricing accepts '<model>' and '<model>:<mode>' and suggests near misses."""
        path = write(tmp_path, "version: 1\nname: a\npricing: {kling-v2-6: 0.1, "
                               "'kling-v2-6:pro': 0.2, kling-v9: 1}\njobs: [{id: j, prompt: hi}]\n")
        found = problems(path)
        assert len(found) == 1 and "kling-v9" in found[0] and ":3:" in found[0]


class TestSchema:
    def test_schema_command_prints_valid_json(self) -> None:
        """``batchkling schema`` prints a JSON Schema document."""
        result = CliRunner().invoke(cli, ["schema"])
        assert result.exit_code == 0
        schema = json.loads(result.output)
        assert schema["$schema"].startswith("https://json-schema.org/")
        assert {"version", "name", "jobs", "matrices"} <= set(schema["properties"])

    def test_committed_schema_is_current(self) -> None:
        """batchkling.schema.json equals the exported schema (regenerate when this fails)."""
        exported = CliRunner().invoke(cli, ["schema"]).output
        assert SCHEMA_FILE.read_text() == exported, (
            "batchkling.schema.json is stale: run `python -m batchkling schema > "
            "batchkling.schema.json`"
        )

    def test_fields_have_descriptions(self) -> None:
        """Job fields carry descriptions so editors can show help."""
        props = manifest_json_schema()["$defs"]["JobFields"]["properties"]
        assert all(field.get("description") for field in props.values())

    @pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
    def test_samples_start_with_schema_comment_and_validate(self, sample: Path) -> None:
        """Every sample points editors at the schema and validates against it."""
        text = sample.read_text()
        assert text.startswith("# yaml-language-server: $schema=../batchkling.schema.json")
        data: Any = yaml.safe_load(text)
        try:
            import jsonschema  # type: ignore[import-untyped]  # optional, not a dependency
        except ImportError:
            # Without jsonschema: the pydantic models the schema is exported from accept it.
            Manifest.model_validate(data)
        else:
            jsonschema.validate(data, json.loads(SCHEMA_FILE.read_text()))
