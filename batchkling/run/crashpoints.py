"""Labelled crash points for tests: ``BATCHKLING_CRASH_AT=label[:n]`` SIGKILLs the process.

Only tests set the variable. ``after_intent`` fires once the create intent is committed and
before the request leaves; ``after_create`` once the provider has answered with a task id and
before that id is committed — the two moments a crash could cost a paid task. ``after_upload``
fires once the object store has confirmed a video and before ``downloaded`` is committed. ``:n``
fires at the n-th time the label is reached (default the first).
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("BATCHKLING_CRASH_AT", "")
_label, _, _nth = _spec.partition(":")
_target = int(_nth) if _nth.isdigit() else 1
_seen = 0


def reached(label: str) -> None:
    """SIGKILL this process if the environment asks for a crash at ``label``."""
    global _seen
    if not _label or label != _label:
        return
    _seen += 1
    if _seen == _target:
        os.kill(os.getpid(), signal.SIGKILL)
