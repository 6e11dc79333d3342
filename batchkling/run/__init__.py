"""The run stage: drive a run's jobs from ``pending`` to a downloaded video or a clear reason.

Owns the orchestrator (a run's lifecycle: snapshot, lease, sync, engine, end-of-run files and
summary), the engine — the one file where a job's state changes (``engine.py``) — flow control
(``limits``: slots, rates, backoff), poll planning (``polling``), verified downloads
(``download``) and the crash points the kill tests use.

May import: ``store``, ``providers``, ``outputs``, ``manifest`` and the foundation modules.
Never the CLI.
"""
