"""The manifest stage: read a YAML manifest, validate it, expand it into jobs, plan it.

Owns the manifest language (``document`` is the whole manifest, ``settings`` its run-wide
sections, ``jobs`` its job and matrix entries), the YAML reader that keeps line and column for
every problem (``yamlsource``), templates and ``vars_from`` CSV rows, image checks, the
expansion into :class:`~batchkling.models.JobSpec` (``expand``, ``jobbuilder``) and ``plan``.

May import: the foundation modules at the package's top (``errors``, ``models``, ``catalog``,
``pricing``, ``clock``, ``logs``). Nothing here knows about the store, the providers or a run.
"""
