"""The outputs stage: what a run leaves behind and how a person reads it.

Owns the results CSV (``results``), the HTML contact sheet (``report``), the status and export
views (``views``) and atomic file writes (``atomic``). Every output is a view of the store.

May import: ``store`` and the foundation modules. Never ``run``, ``providers`` or the CLI.
"""
