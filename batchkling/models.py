"""Values shared by every part of batchkling: job specs, states, attempts, summaries."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit


class JobKind(StrEnum):
    """What a job asks the provider for, derived from which images it carries."""

    TEXT = "text"
    IMAGE = "image"
    FIRST_LAST = "first-last"


class JobState(StrEnum):
    """Where a job stands. Every change is committed before the next side effect."""

    PENDING = "pending"
    SUBMITTING = "submitting"  # create intent committed; outcome not yet known
    SUBMITTED = "submitted"  # task id known
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # provider finished; video not (yet) on disk
    DOWNLOADED = "downloaded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"  # poll deadline passed; polled again on resume
    UNKNOWN = "unknown"  # create outcome could not be established
    SKIPPED = "skipped"  # no longer in the manifest


#: States a job never leaves without a person asking (``retry``) or a manifest edit.
TERMINAL = frozenset({JobState.DOWNLOADED, JobState.FAILED, JobState.SKIPPED})
#: States in which a provider task may exist and hold an account slot.
IN_FLIGHT = frozenset({JobState.SUBMITTED, JobState.RUNNING})
#: A run's lease is presumed dead when its heartbeat is older than this many seconds (the
#: heartbeat comes every 5 s): another runner may take it over, and screens stop calling the
#: run "running".
LEASE_STALE_AFTER = 30.0


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One expanded job: a single provider request with a stable id.

    ``image`` and ``image_tail`` are absolute local paths or http(s) URLs. ``image_sha256`` and
    ``image_tail_sha256`` hold the content hash of local files (None for URLs) so the fingerprint
    changes when an image file changes. ``variables`` are the matrix variables and axes that
    produced the job, in declaration order (they become ``var.*`` CSV columns); ``group`` is the
    matrix id template the job came from, None for explicit jobs.
    """

    job_id: str
    model: str
    prompt: str
    duration: int
    size: str
    mode: str | None = None
    negative_prompt: str | None = None
    image: str | None = None
    image_tail: str | None = None
    image_sha256: str | None = None
    image_tail_sha256: str | None = None
    cfg_scale: float | None = None
    camera_control: Mapping[str, Any] | None = None
    sound: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    variables: Mapping[str, str] = field(default_factory=dict)
    group: str | None = None
    # Filled in on first read of ``fingerprint``; not a value of the job (no init, eq or repr).
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def kind(self) -> JobKind:
        """Text-to-video, image-to-video, or first-last-frame."""
        if self.image_tail:
            return JobKind.FIRST_LAST
        if self.image:
            return JobKind.IMAGE
        return JobKind.TEXT

    def request(self) -> dict[str, Any]:
        """The canonical request: every field that changes what the provider renders."""
        out: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompt,
            "duration": self.duration,
            "size": self.size,
        }
        optional: dict[str, Any] = {
            "mode": self.mode,
            "negative_prompt": self.negative_prompt,
            "image": _content_ref(self.image, self.image_sha256),
            "image_tail": _content_ref(self.image_tail, self.image_tail_sha256),
            "cfg_scale": self.cfg_scale,
            "camera_control": dict(self.camera_control) if self.camera_control else None,
            "sound": self.sound,
            "metadata": dict(self.metadata) if self.metadata else None,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out

    @property
    def fingerprint(self) -> str:
        """Hash of the canonical request; local images count by content, not by path."""
        found = self._fingerprint
        if found is None:
            blob = _CANONICAL.encode(self.request())
            found = hashlib.sha256(blob.encode()).hexdigest()[:32]
            object.__setattr__(self, "_fingerprint", found)  # frozen: a cache, not a change
        return found

    def to_json(self) -> str:
        """Serialise for the checkpoint store."""
        data = {
            name: getattr(self, name)
            for name, spec_field in self.__dataclass_fields__.items()
            if spec_field.init and getattr(self, name) not in (None, {}, ())
        }
        data["metadata"] = dict(self.metadata)
        data["variables"] = dict(self.variables)
        if self.camera_control is not None:
            data["camera_control"] = dict(self.camera_control)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, blob: str) -> JobSpec:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(blob))


#: ``json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)`` builds this
#: encoder on every call; one shared instance writes the same text without that set-up.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def _content_ref(source: str | None, sha256: str | None) -> str | None:
    """A local image counts by its content hash, so moving the file changes nothing."""
    return f"sha256:{sha256}" if sha256 else source


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What a run ended with; the CLI turns ``exit_code`` into the process exit status."""

    run_id: str
    counts: Mapping[str, int]
    cost_usd: float
    stop_reason: str | None
    exit_code: int
    results_csv: str | None = None
    cost_units: float = 0.0  #: provider units (Kling), which carry no USD price
    committed_usd: float = 0.0  #: cost plus estimates for what reported no price
    #: Why creates stopped, in one word: ``account``, ``budget``, ``unreachable``, ``store``,
    #: ``interrupted`` (None: they did not stop early).
    stop_kind: str | None = None
    #: Jobs by store state (``downloaded``, ``running`` …), where ``counts`` uses the CSV's words.
    states: Mapping[str, int] = field(default_factory=dict)
    report_html: str | None = None
    #: The run's caps (``budget.max_usd``, ``budget.max_units``) and its committed units.
    max_usd: float | None = None
    max_units: float | None = None
    committed_units: float = 0.0
    #: What a person should know about the money (prices above the table, a passed cap).
    notes: tuple[str, ...] = ()
    #: Jobs that took an earlier run's video in this invocation (``reuse: earlier-runs``).
    reused: int = 0

    def cost_text(self) -> str:
        """The cost as a person should read it: USD, or units with the estimate beside them."""
        return describe_cost(self.cost_usd, self.cost_units, self.committed_usd)

    @property
    def total(self) -> int:
        """Number of jobs in the run."""
        return sum(self.counts.values())


def describe_cost(usd: float, units: float, committed_usd: float) -> str:
    """``$1.05``; for a provider that reports units, ``7.5 units (about $0.75 …)``."""
    if units <= 0:
        return f"${usd:.2f}"
    text = f"{units:g} units" if usd <= 0 else f"${usd:.2f} + {units:g} units"
    return f"{text} (the provider reports units, not USD; about ${committed_usd:.2f} by the " \
           "price table)"


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True, slots=True)
class StoreURL:
    """An object store location, ``s3://bucket/prefix/``, taken apart; ``prefix`` is empty or
    ends with ``/`` (``output.store`` in a manifest)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> StoreURL:
        """Check and normalise a store URL; raise ValueError saying what is wrong."""
        parts = urlsplit(url.strip())
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"expected s3://bucket/prefix/; found {url!r}")
        if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError(f"expected s3://bucket/prefix/ with no credentials, port, query or "
                             f"fragment; found {url!r}")
        bucket = parts.netloc
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise ValueError(f"{bucket!r} is not a valid bucket name (3-63 lowercase letters, "
                             "digits, '.' and '-')")
        segments = [s for s in parts.path.split("/") if s]
        if any(s in (".", "..") for s in segments) or "//" in parts.path.strip("/"):
            raise ValueError(f"the prefix of {url!r} has empty, '.' or '..' segments")
        prefix = "".join(f"{s}/" for s in segments)
        return cls(bucket, prefix)

    def uri(self, key: str = "") -> str:
        """``s3://bucket/<prefix><key>``."""
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def __str__(self) -> str:
        return self.uri()
