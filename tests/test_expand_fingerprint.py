"""Fingerprints of expanded jobs: computed once, and the same value as ever for the same request."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import PurePosixPath
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from batchkling.models import JobSpec


def reference_fingerprint(spec: JobSpec) -> str:
    """The fingerprint as first defined: sha256 of the sorted, compact JSON of the request."""
    blob = json.dumps(spec.request(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


TEXT = st.text(max_size=40)  # any code point, surrogates included
SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT
    | st.builds(PurePosixPath, st.text(alphabet="ab/", max_size=5))  # through default=str
)
NESTED = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
SPECS = st.builds(
    JobSpec,
    job_id=st.just("j"),
    model=TEXT,
    prompt=TEXT,
    duration=st.integers() | st.booleans() | st.floats(),
    size=TEXT,
    mode=st.none() | TEXT,
    negative_prompt=st.none() | TEXT,
    image=st.none() | TEXT,
    image_tail=st.none() | TEXT,
    image_sha256=st.none() | st.text(alphabet="0123456789abcdef", max_size=64),
    image_tail_sha256=st.none() | st.text(alphabet="0123456789abcdef", max_size=64),
    cfg_scale=st.none() | st.floats(allow_nan=True) | st.integers(),
    camera_control=st.none() | st.dictionaries(TEXT, NESTED, max_size=3),
    sound=st.none() | TEXT,
    metadata=st.dictionaries(TEXT, NESTED, max_size=3),
)


class TestFingerprintValue:
    @settings(max_examples=300, deadline=None)
    @given(spec=SPECS)
    def test_equals_the_hash_of_the_sorted_json_request(self, spec: JobSpec) -> None:
        """For any request (unicode, NaN, bools, nested values, non-JSON objects) the value is
        sha256 of ``json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)``."""
        assert spec.fingerprint == reference_fingerprint(spec)

    def test_known_values_do_not_change(self) -> None:
        """Fingerprints stored by earlier versions still match: resume must not see changes."""
        text = JobSpec(job_id="a", model="kling-v2-6", prompt="a red fox — in snow ✓",
                       duration=5, size="16:9", mode="std")
        image = JobSpec(job_id="b", model="kling-v1-6", prompt="p", duration=10, size="1:1",
                        cfg_scale=0.5, image="/x/a.jpg", image_sha256="ab" * 32,
                        camera_control={"type": "simple", "config": {"zoom": 5}},
                        metadata={"seed": 7, "tags": ["a", None, True]})
        assert text.fingerprint == "d96f8067beb81e4b08861cd5319b3c19"
        assert image.fingerprint == "933671b6d1551263b339d2c255318a71"


class TestFingerprintCache:
    def spec(self, **changes: Any) -> JobSpec:
        """A small image-to-video spec with ``changes`` applied."""
        fields: dict[str, Any] = {"job_id": "a", "model": "kling-v2-6", "prompt": "x",
                                  "duration": 5, "size": "16:9", "image": "/i.jpg",
                                  "image_sha256": "0" * 64, "metadata": {"k": [1, 2.5]}}
        return JobSpec(**(fields | changes))

    def test_computed_once(self, monkeypatch: Any) -> None:
        """Reading the fingerprint again does not serialise the request again."""
        spec = self.spec()
        calls = []
        real = JobSpec.request

        def counting(self: JobSpec) -> dict[str, Any]:
            calls.append(self.job_id)
            return real(self)

        monkeypatch.setattr(JobSpec, "request", counting)
        assert spec.fingerprint == spec.fingerprint == reference_fingerprint(self.spec())
        assert len(calls) == 2  # one for the cached value, one inside reference_fingerprint

    def test_not_part_of_the_value(self) -> None:
        """The cache is not in equality, repr or to_json, and to_json/from_json round-trips."""
        read, unread = self.spec(), self.spec()
        _ = read.fingerprint
        assert read == unread
        assert repr(read) == repr(unread)
        assert read.to_json() == unread.to_json()
        assert "_fingerprint" not in read.to_json()
        back = JobSpec.from_json(read.to_json())
        assert back == read
        assert back.fingerprint == read.fingerprint

    def test_replace_recomputes(self) -> None:
        """A spec made with dataclasses.replace gets the fingerprint of its own request."""
        spec = self.spec()
        _ = spec.fingerprint
        other = dataclasses.replace(spec, prompt="y")
        assert other.fingerprint == reference_fingerprint(other) != spec.fingerprint
        same = dataclasses.replace(spec, job_id="b", variables={"v": "1"}, group="g")
        assert same.fingerprint == spec.fingerprint

    def test_float_spellings_match_json(self) -> None:
        """NaN, infinities and -0.0 in cfg_scale hash as json writes them."""
        for value in (math.nan, math.inf, -math.inf, -0.0, 1e-7, 0.1):
            spec = self.spec(cfg_scale=value)
            assert spec.fingerprint == reference_fingerprint(spec)
