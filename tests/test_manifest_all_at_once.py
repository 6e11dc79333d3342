"""Every manifest mistake in one report: id problems come with the others, and enum values
written in the wrong case get a did-you-mean."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from batchkling.errors import ManifestError
from batchkling.manifest.document import load_manifest


def _problems(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(body))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return [str(p) for p in caught.value.problems]


def test_id_problems_come_with_the_other_problems(tmp_path: Path) -> None:
    """A duplicate id on a job with an unknown key, and an unsafe id on a job with a bad
    duration or model, are reported in the same run as those problems."""
    problems = _problems(tmp_path, """\
        version: 1
        name: m
        jobs:
          - {id: a, prompt: x}
          - {id: a, prompt: y, promt: q}
          - {id: "bad/id", prompt: z, duration: 7}
          - {id: "d d", prompt: z, model: nope}
        """)
    text = "\n".join(problems)
    assert "duplicate job id 'a' from jobs[1]" in text
    assert "unknown key 'promt'" in text
    assert "job id 'bad/id' from jobs[2] is not a safe file name" in text
    assert "duration must be 5 or 10" in text
    assert "job id 'd d' from jobs[3] is not a safe file name" in text
    assert "model must be one of" in text
    assert len(problems) == 6


def test_a_job_with_a_bad_field_still_claims_its_id(tmp_path: Path) -> None:
    """Two jobs share an id and the second has a bad image path: both problems show."""
    problems = _problems(tmp_path, """\
        version: 1
        name: m
        jobs:
          - {id: a, prompt: x}
          - {id: a, prompt: y, image: missing.jpg}
        """)
    assert any("duplicate job id 'a'" in p for p in problems)
    assert any("missing.jpg" in p for p in problems)


@pytest.mark.parametrize(("field", "value", "suggested"), [
    ("mode", "PRO", "pro"), ("model", "KLING-V2-6", "kling-v2-6"), ("size", "wide", None),
])
def test_enum_values_in_another_case_get_a_suggestion(
    tmp_path: Path, field: str, value: str, suggested: str | None
) -> None:
    """`mode: PRO` is told `did you mean 'pro'?`."""
    problems = _problems(tmp_path, f"""\
        version: 1
        name: m
        jobs:
          - {{id: a, prompt: x, {field}: "{value}"}}
        """)
    (problem,) = problems
    assert ("did you mean" in problem) == (suggested is not None)
    if suggested:
        assert f"(did you mean '{suggested}'?)" in problem
