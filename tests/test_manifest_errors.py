"""Broken manifests: every problem reported at once, each on one line at the right file:line.

Each fixture in ``tests/fixtures/manifests/`` marks the lines that must be reported with a
trailing ``# ERROR`` comment, optionally ``# ERROR: text the message must contain``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchkling.cli import cli
from batchkling.errors import ManifestError
from batchkling.manifest import yamlsource
from batchkling.manifest.document import load_manifest

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"
BROKEN = sorted(p.name for p in FIXTURES.glob("*.yaml"))
_MARK = re.compile(r"# ERROR(?::\s*(.*?))?\s*$")
_REPORTED = re.compile(r"^error: (?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<rest>.*)$")


def expected_marks(path: Path) -> dict[int, str]:
    """Line number → message fragment, from the fixture's ``# ERROR`` comments."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    marks = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _MARK.search(line)
        if match:
            marks[number] = match.group(1) or ""
    return marks


COMPOSERS = {"pure": yamlsource._PureComposer, "libyaml": yamlsource._libyaml_composer()}


@pytest.fixture(params=sorted(COMPOSERS))
def composer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test twice: with libyaml's parser (used when PyYAML has it) and PyYAML's own."""
    chosen = COMPOSERS[request.param]
    if chosen is None:
        pytest.skip("PyYAML was built without libyaml")
    monkeypatch.setattr(yamlsource, "_Composer", chosen)
    return str(request.param)


def run_plan(path: Path) -> tuple[int, str, list[re.Match[str]]]:
    """Run ``batchkling plan`` in-process; return exit code, stderr and the error lines."""
    result = CliRunner().invoke(cli, ["plan", str(path)])
    errors = [m for line in result.stderr.splitlines() if (m := _REPORTED.match(line))]
    return result.exit_code, result.stderr, errors


@pytest.mark.usefixtures("composer")
class TestBrokenManifests:
    @pytest.mark.parametrize("name", BROKEN)
    def test_exits_2_with_one_line_per_problem_at_the_marked_lines(self, name: str) -> None:
        """Each broken fixture exits 2 and reports exactly its marked lines, messages included."""
        path = FIXTURES / name
        marks = expected_marks(path)
        assert marks, f"{name} marks no expected problem"
        code, stderr, errors = run_plan(path)
        assert code == 2, stderr
        assert "Traceback" not in stderr
        manifest_errors = [m for m in errors if m["file"] == str(path)]
        assert {int(m["line"]) for m in manifest_errors} == set(marks), stderr
        for m in manifest_errors:
            fragment = marks[int(m["line"])]
            line_text = [e["rest"] for e in manifest_errors if e["line"] == m["line"]]
            assert any(fragment in text for text in line_text), (fragment, line_text)
        assert f"{len(errors)} problem" in stderr

    def test_many_problems_are_all_reported_in_one_run(self) -> None:
        """A manifest with a dozen different mistakes lists every one of them, in file order."""
        path = FIXTURES / "many_problems.yaml"
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        lines = [p.line for p in info.value.problems]
        assert len(lines) == len(expected_marks(path)) >= 12
        assert lines == sorted(lines)
        assert all(p.column and p.column >= 1 for p in info.value.problems)

    def test_problems_carry_dotted_field_paths(self) -> None:
        """Problems name the field like matrices[0].axes.size[1] and jobs[2].image."""
        with pytest.raises(ManifestError) as info:
            load_manifest(FIXTURES / "many_problems.yaml")
        paths = {p.path for p in info.value.problems}
        assert {"matrices[0].axes.size[1]", "jobs[2].image", "limits.max_in_flight"} <= paths

    def test_python_tag_is_never_executed(self, tmp_path: Path) -> None:
        """A !!python/object/apply tag is a problem; the command in it never runs."""
        target = tmp_path / "pwned"
        manifest = tmp_path / "m.yaml"
        manifest.write_text(
            f'version: 1\nname: !!python/object/apply:os.system ["touch {target}"]\n'
            "jobs: [{id: a, prompt: hi}]\n"
        )
        with pytest.raises(ManifestError) as info:
            load_manifest(manifest)
        assert not target.exists()
        assert "not allowed" in info.value.problems[0].message

    def test_duplicate_ids_name_both_locations(self) -> None:
        """A duplicate id reports where it was produced first as well as the second place."""
        with pytest.raises(ManifestError) as info:
            load_manifest(FIXTURES / "duplicate_ids.yaml")
        first = info.value.problems[0]
        assert first.line == 7 and "duplicate_ids.yaml:5:" in first.message


@pytest.mark.usefixtures("composer")
class TestUnreadable:
    def test_missing_file_is_one_problem(self, tmp_path: Path) -> None:
        """A manifest that does not exist is a ManifestError with one problem, not OSError."""
        with pytest.raises(ManifestError) as info:
            load_manifest(tmp_path / "nope.yaml")
        assert len(info.value.problems) == 1
        assert "cannot read manifest" in info.value.problems[0].message

    def test_directory_is_one_problem(self, tmp_path: Path) -> None:
        """Passing a folder instead of a file is reported cleanly."""
        with pytest.raises(ManifestError) as info:
            load_manifest(tmp_path)
        assert len(info.value.problems) == 1

    def test_empty_and_non_mapping_documents(self, tmp_path: Path) -> None:
        """An empty file and a top-level list are both clean problems at line 1."""
        empty = tmp_path / "empty.yaml"
        empty.write_text("")
        listed = tmp_path / "list.yaml"
        listed.write_text("- a\n- b\n")
        for path in (empty, listed):
            with pytest.raises(ManifestError) as info:
                load_manifest(path)
            assert info.value.problems[0].line == 1

    def test_utf16_is_named(self, tmp_path: Path) -> None:
        """A UTF-16 file says so instead of failing on the first byte."""
        path = tmp_path / "m.yaml"
        path.write_bytes("version: 1\n".encode("utf-16"))
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert "UTF-16" in info.value.problems[0].message

    def test_alias_bomb_and_self_reference_are_problems(self, tmp_path: Path) -> None:
        """A recursive alias and an exponential alias bomb end as problems, not hangs."""
        recursive = tmp_path / "r.yaml"
        recursive.write_text("version: 1\nname: r\njobs: &a [*a]\n")
        with pytest.raises(ManifestError):
            load_manifest(recursive)
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
        bomb = tmp_path / "bomb.yaml"
        bomb.write_text("\n".join(lines) + "\n")
        with pytest.raises(ManifestError) as info:
            load_manifest(bomb)
        assert "too many" in info.value.problems[0].message

    @pytest.mark.parametrize("depth", [900, 5_000])
    def test_deep_nesting_is_a_problem_not_a_crash(self, tmp_path: Path, depth: int) -> None:
        """Lists nested thousands deep end as one problem (libyaml refuses past 1,000 levels;
        PyYAML's own parser and the value builder run out of Python stack)."""
        path = tmp_path / "deep.yaml"
        path.write_text("version: 1\nname: d\njobs: " + "[" * depth + "]" * depth + "\n")
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert len(info.value.problems) == 1
        assert re.search(r"nest|YAML", info.value.problems[0].message), info.value.problems

    def test_duplicate_yaml_keys_are_reported(self, tmp_path: Path) -> None:
        """The same key twice in one mapping is a problem at the second one."""
        path = tmp_path / "m.yaml"
        path.write_text("version: 1\nname: a\nname: b\njobs: [{id: a, prompt: hi}]\n")
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert (info.value.problems[0].line, "duplicate key") == (3, "duplicate key")


class TestRealProcess:
    def test_subprocess_reports_problems_without_traceback(self) -> None:
        """``python -m batchkling plan`` on a broken manifest exits 2 with no traceback."""
        path = FIXTURES / "many_problems.yaml"
        env = {**os.environ, "COLUMNS": "200"}
        proc = subprocess.run(
            [sys.executable, "-m", "batchkling", "plan", str(path)],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        reported = {int(m["line"]) for line in proc.stderr.splitlines()
                    if (m := _REPORTED.match(line))}
        assert reported == set(expected_marks(path))
        assert proc.stdout == ""
