"""Expansion: order, templates, CSV variables, include/exclude, ids, fingerprints, image hashing."""

from __future__ import annotations

import itertools
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import batchkling.manifest.images
from batchkling.errors import ManifestError
from batchkling.manifest.document import load_manifest
from batchkling.manifest.templates import TemplateError, compile_template
from batchkling.manifest.yamlsource import load_yaml


def write(folder: Path, body: str, name: str = "m.yaml") -> Path:
    """Write a manifest (dedented) into ``folder`` and return its path."""
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def make_image(path: Path, colour: tuple[int, int, int] = (10, 20, 30)) -> Path:
    """A valid 640x360 jpg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (640, 360), colour).save(path, "JPEG")
    return path


class TestTemplates:
    def test_placeholders_filters_and_escapes(self) -> None:
        """{name}, {name:slug}/lower/upper fill in; {{ and }} are literal braces."""
        tpl = compile_template("{p}-{s:slug} {{x}} {p:upper}")
        assert tpl.render({"p": "Watch", "s": "16:9"}) == "Watch-16x9 {x} WATCH"
        assert compile_template("plain {{text}}").constant == "plain {text}"

    @pytest.mark.parametrize("text", ["{unclosed", "a } b", "{bad name}", "{x:nofilter}", "{}"])
    def test_malformed_templates(self, text: str) -> None:
        """Unclosed braces, stray '}', bad names and unknown filters are template errors."""
        with pytest.raises(TemplateError):
            compile_template(text)

    def test_templates_in_any_string_field(self, tmp_path: Path) -> None:
        """id, prompt, negative_prompt, image and nested metadata strings are all templated."""
        make_image(tmp_path / "img" / "watch.jpg")
        path = write(tmp_path, """\
            version: 1
            name: t
            matrices:
              - id: "{p}-{size:slug}"
                prompt: "{p} ad"
                negative_prompt: "no {p}s"
                image: "img/{p}.jpg"
                metadata: {sku: "{p}", nested: ["{size}"], n: 3}
                vars: {p: [watch]}
                axes: {size: ["9:16"]}
            """)
        spec = load_manifest(path).specs[0]
        assert spec.job_id == "watch-9x16"
        assert (spec.prompt, spec.negative_prompt) == ("watch ad", "no watchs")
        assert spec.image == str(tmp_path / "img" / "watch.jpg")
        assert spec.metadata == {"sku": "watch", "nested": ["9:16"], "n": 3}
        assert spec.variables == {"p": "watch", "size": "9:16"}
        assert spec.group == "{p}-{size:slug}"

    def test_template_in_explicit_job_is_a_problem(self, tmp_path: Path) -> None:
        """Explicit jobs have no variables: a placeholder there is reported."""
        path = write(tmp_path, "version: 1\nname: t\njobs: [{id: a, prompt: '{x}'}]\n")
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert "explicit jobs have no variables" in info.value.problems[0].message

    def test_axes_vary_any_field(self, tmp_path: Path) -> None:
        """Axes over model, duration and mode give every combination, in written order."""
        path = write(tmp_path, """\
            version: 1
            name: t
            matrices:
              - id: "{model}-{duration}-{mode}"
                prompt: x
                axes:
                  duration: [10, 5]
                  model: [kling-v2-6, kling-v1-6]
                  mode: [pro, std]
            """)
        specs = load_manifest(path).specs
        assert [s.job_id for s in specs][:3] == [
            "kling-v2-6-10-pro", "kling-v2-6-10-std", "kling-v1-6-10-pro"]
        assert len(specs) == 8 and specs[0].duration == 10
        assert list(specs[0].variables) == ["duration", "model", "mode"]


class TestCsvVariables:
    def test_rows_in_file_order_and_formula_cells_are_text(self, tmp_path: Path) -> None:
        """CSV rows expand in file order; a cell like =HYPERLINK(...) is only text."""
        (tmp_path / "p.csv").write_text('product,tag\nwatch,"=HYPERLINK(""x"")"\nbag,@now\n')
        path = write(tmp_path, """\
            version: 1
            name: t
            matrices:
              - {id: "{product}", prompt: "{tag}", vars_from: p.csv}
            """)
        specs = load_manifest(path).specs
        assert [(s.job_id, s.prompt) for s in specs] == [
            ("watch", '=HYPERLINK("x")'), ("bag", "@now")]

    @pytest.mark.parametrize(
        ("csv_text", "fragment", "line"),
        [
            ("product,name\nwatch\n", "row has 1 cells", 2),
            ("product,bad name\nwatch,x\n", "not a variable name", 1),
            ("product,product\nwatch,x\n", "appears twice", 1),
            ("product\n", "no rows", None),
        ],
    )
    def test_bad_csv_is_located_in_the_csv(
        self, tmp_path: Path, csv_text: str, fragment: str, line: int | None
    ) -> None:
        """Ragged rows, bad or repeated column names and empty CSVs are named with their line."""
        (tmp_path / "p.csv").write_text(csv_text)
        path = write(tmp_path, "version: 1\nname: t\nmatrices:\n"
                               "  - {id: '{product}', prompt: x, vars_from: p.csv}\n")
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        problem = info.value.problems[0]
        assert fragment in problem.message
        if line is not None:
            assert problem.file.endswith("p.csv") and problem.line == line

    def test_missing_csv(self, tmp_path: Path) -> None:
        """A vars_from file that does not exist is a problem at the vars_from line."""
        path = write(tmp_path, "version: 1\nname: t\nmatrices:\n"
                               "  - id: '{p}'\n    prompt: x\n    vars_from: nope.csv\n")
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert info.value.problems[0].line == 6


class TestIncludeExclude:
    def test_exclude_and_include_with_completion(self, tmp_path: Path) -> None:
        """Exclude drops matches; include appends, completing CSV columns from the matching row."""
        (tmp_path / "p.csv").write_text("product,name\nwatch,Steel Watch\nbag,Tan Bag\n")
        path = write(tmp_path, """\
            version: 1
            name: t
            matrices:
              - id: "{product}-{size:slug}-{mode}"
                prompt: "{name}"
                vars_from: p.csv
                axes: {size: ["16:9", "9:16"], mode: [std, pro]}
                exclude: [{size: "9:16", mode: pro}]
                include: [{id: bag-hero, product: bag, size: "1:1", mode: pro, duration: 10}]
            """)
        specs = load_manifest(path).specs
        ids = [s.job_id for s in specs]
        assert ids == ["watch-16x9-std", "watch-16x9-pro", "watch-9x16-std",
                       "bag-16x9-std", "bag-16x9-pro", "bag-9x16-std", "bag-hero"]
        hero = specs[-1]
        assert (hero.prompt, hero.size, hero.mode, hero.duration) == ("Tan Bag", "1:1", "pro", 10)

    def test_include_key_typo_and_unmatched_exclude(self, tmp_path: Path) -> None:
        """An include key that is neither variable nor field is an error with a suggestion."""
        path = write(tmp_path, """\
            version: 1
            name: t
            matrices:
              - id: "{p}"
                prompt: x
                vars: {p: [a, b]}
                include: [{id: c, pp: c}]
            """)
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert "did you mean 'p'" in info.value.problems[0].message

    def test_exclude_matching_nothing_warns(self, tmp_path: Path) -> None:
        """An exclude that removes no job is a warning (probably a stale value)."""
        path = write(tmp_path, "version: 1\nname: t\nmatrices:\n  - id: '{p}'\n    prompt: x\n"
                               "    vars: {p: [a, b]}\n    exclude: [{p: z}]\n")
        m = load_manifest(path)
        assert len(m.specs) == 2 and "matches no job" in m.warnings[0].message


# -- property tests ------------------------------------------------------------------------------

# The test writes YAML with PyYAML (YAML 1.1), which leaves e.g. `0e0`, `0o7` or `08` unquoted;
# the manifest loader reads YAML 1.2, where those are numbers. Only tokens that come back as the
# same text through both are generated: the check is the round trip itself, not a list of forms.
def _stays_text(token: str) -> bool:
    return load_yaml(yaml.safe_dump([token]), "t.yaml").data == [token]


_token = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=4).filter(
    _stays_text)


@st.composite
def matrices(draw: st.DrawFn) -> dict[str, Any]:
    """A random matrix: vars lists, some axes, excludes and includes, with an all-variable id."""
    n_vars = draw(st.integers(0, 2))
    vars_ = {f"v{i}": draw(st.lists(_token, min_size=1, max_size=3, unique=True))
             for i in range(n_vars)}
    axis_pool = {"size": ["16:9", "9:16", "1:1"], "mode": ["std", "pro"], "duration": [5, 10]}
    names = draw(st.lists(st.sampled_from(sorted(axis_pool)), unique=True, max_size=3))
    axes = {n: draw(st.lists(st.sampled_from(axis_pool[n]), min_size=1, unique=True))
            for n in names}
    values: dict[str, list[Any]] = {**vars_, **axes}
    excludes = []
    for _ in range(draw(st.integers(0, 2))):
        keys = draw(st.lists(st.sampled_from(sorted(values)), unique=True, min_size=1)) \
            if values else []
        if keys:
            excludes.append({k: draw(st.sampled_from(values[k])) for k in keys})
    includes = [{"id": f"inc-{i}", **{k: draw(st.sampled_from(v)) for k, v in values.items()},
                 "duration": 10} for i in range(draw(st.integers(0, 2)))]
    id_template = "-".join(["m", *(f"{{{k}:slug}}" for k in values)])
    return {"id": id_template, "prompt": "p " + " ".join(f"{{{k}}}" for k in vars_),
            "vars": vars_, "axes": axes, "exclude": excludes, "include": includes}


def _slug(value: Any) -> str:
    return str(value).replace(":", "x").lower()


def naive_ids(matrix: dict[str, Any]) -> list[str]:
    """The expected ids, computed independently of batchkling's expansion."""
    names = [*matrix["vars"], *matrix["axes"]]
    lists = [*matrix["vars"].values(), *matrix["axes"].values()]
    out = []
    for combo in itertools.product(*lists):
        values = dict(zip(names, combo, strict=True))
        if any(all(str(values[k]) == str(v) for k, v in ex.items()) for ex in matrix["exclude"]):
            continue
        out.append("-".join(["m", *(_slug(values[n]) for n in names)]))
    return out + [inc["id"] for inc in matrix["include"]]


class TestExpansionProperties:
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(matrix=matrices())
    def test_deterministic_unique_and_include_exclude_semantics(
        self, matrix: dict[str, Any]
    ) -> None:
        """Same manifest → same ids, order and fingerprints; ids unique; include/exclude exact."""
        doc = {"version": 1, "name": "prop", "matrices": [matrix]}
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "m.yaml"
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            expected = naive_ids(matrix)
            if not expected:
                with pytest.raises(ManifestError):
                    load_manifest(path)
                return
            first, second = load_manifest(path).specs, load_manifest(path).specs
        assert [s.job_id for s in first] == expected
        assert len(set(expected)) == len(expected)
        assert [(s.job_id, s.fingerprint) for s in first] == [
            (s.job_id, s.fingerprint) for s in second]
        for spec, inc in zip(first[len(first) - len(matrix["include"]):], matrix["include"],
                             strict=True):
            assert spec.duration == 10 and spec.job_id == inc["id"]


class TestFingerprints:
    def _manifest(self, folder: Path, image: str) -> Path:
        return write(folder, f"version: 1\nname: f\njobs: [{{id: a, prompt: x, image: {image}}}]\n")

    def test_changes_with_image_bytes_not_with_its_path(self, tmp_path: Path) -> None:
        """Editing an image changes the fingerprint; moving or renaming it does not."""
        make_image(tmp_path / "a.jpg")
        before = load_manifest(self._manifest(tmp_path, "a.jpg")).specs[0]
        (tmp_path / "moved").mkdir()
        shutil.move(tmp_path / "a.jpg", tmp_path / "moved" / "b.jpg")
        moved = load_manifest(self._manifest(tmp_path, "moved/b.jpg")).specs[0]
        assert moved.image != before.image
        assert moved.fingerprint == before.fingerprint
        make_image(tmp_path / "moved" / "b.jpg", colour=(200, 0, 0))
        edited = load_manifest(self._manifest(tmp_path, "moved/b.jpg")).specs[0]
        assert edited.fingerprint != before.fingerprint
        assert edited.image_sha256 != before.image_sha256

    def test_images_hashed_once_per_path(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A 600-job matrix over 3 images opens and hashes each image file once."""
        for name in ("a", "b", "c"):
            make_image(tmp_path / f"{name}.jpg")
        calls: list[Path] = []
        real = batchkling.manifest.images.check_image

        def counting(path: Path) -> batchkling.manifest.images.ImageCheck:
            calls.append(path)
            return real(path)

        monkeypatch.setattr(batchkling.manifest.images, "check_image", counting)
        path = write(tmp_path, """\
            version: 1
            name: f
            matrices:
              - id: "{img}-{n}"
                prompt: x
                image: "{img}.jpg"
                vars: {img: [a, b, c], n: NUMBERS}
            """.replace("NUMBERS", str(list(range(200)))))
        assert len(load_manifest(path).specs) == 600
        assert sorted(p.name for p in calls) == ["a.jpg", "b.jpg", "c.jpg"]

    def test_repeated_problem_is_counted_not_repeated(self, tmp_path: Path) -> None:
        """A problem hit by 1,000 jobs is shown a few times, then summarised with a count."""
        path = write(tmp_path, """\
            version: 1
            name: f
            matrices:
              - id: "same"
                prompt: x
                vars: {n: NUMBERS}
            """.replace("NUMBERS", str(list(range(1000)))))
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert len(info.value.problems) == 4
        assert "996 more" in info.value.problems[-1].message


class TestSpool:
    """`run` and `submit` expand a manifest into a scratch file, not into memory."""

    def test_spooled_jobs_read_back_equal_and_as_often_as_needed(self, tmp_path: Path) -> None:
        make_image(tmp_path / "img" / "watch.jpg")
        path = write(tmp_path, """\
            version: 1
            name: t
            jobs:
              - id: first
                prompt: "a line\\nbreak, ünïcode and a \\ttab"
                image: img/watch.jpg
                metadata: {campaign: spring, nested: {k: [1, 2]}}
            matrices:
              - id: "{p}-{size:slug}-{mode}"
                prompt: "{p} ad"
                vars: {p: [watch, shoe]}
                axes: {size: ["16:9", "1:1"], mode: [std, pro]}
            """)
        held = load_manifest(path)
        spooled = load_manifest(path, spool=True)
        assert spooled.specs == () and spooled.job_count == held.job_count == 9
        for _ in range(2):  # a run reads it twice: to compare with the store, then to record
            again = list(spooled.expand())
            assert again == list(held.expand())
            assert [s.fingerprint for s in again] == [s.fingerprint for s in held.expand()]
        assert [s.image_sha256 for s in again] == [s.image_sha256 for s in held.specs]

    def test_a_bad_manifest_spools_nothing_and_says_what(self, tmp_path: Path) -> None:
        path = write(tmp_path, """\
            version: 1
            name: t
            jobs:
              - id: a
                prompt: x
                duration: 7
            """)
        with pytest.raises(ManifestError, match="duration"):
            load_manifest(path, spool=True)
