"""The SQLite checkpoint database's schema: its tables and triggers, and their versions.

Every job state change is one ``UPDATE`` of its ``jobs`` row that sets ``last_event``; the
triggers below do the rest inside that one statement: a new attempt number inserts the attempt's
row, and every transition mirrors the attempt's fields and appends an event.
"""

from __future__ import annotations

SCHEMA_VERSION = 4

#: Steps from each older schema version to the next; ``SCHEMA`` then adds what is missing
#: (tables, indexes, triggers) with ``IF NOT EXISTS``. Version 1 had no ``last_event`` columns;
#: version 2 had no accounts, workers or claims, no running money totals on the run, no
#: object-store columns (``video_uri``, ``video_etag``; the attempt's video) and triggers that
#: did not mirror them, so those are dropped and made again. Version 3 had no money in units
#: (``budget.max_units``), no price groups, no reuse across runs and no observed prices; its
#: ``attempt_cost`` triggers summed dollars only.
MIGRATIONS = {
    1: """
        ALTER TABLE jobs ADD COLUMN last_event TEXT;
        ALTER TABLE jobs ADD COLUMN last_event_data TEXT;
    """,
    2: """
        ALTER TABLE jobs ADD COLUMN account_id TEXT;
        ALTER TABLE jobs ADD COLUMN worker_id TEXT;
        ALTER TABLE jobs ADD COLUMN claim_epoch INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE runs ADD COLUMN reserved_usd REAL NOT NULL DEFAULT 0;
        ALTER TABLE runs ADD COLUMN spent_usd REAL NOT NULL DEFAULT 0;
        UPDATE runs SET
            reserved_usd = (SELECT COALESCE(SUM(reserved_usd), 0) FROM jobs
                            WHERE jobs.run_id = runs.run_id),
            spent_usd = (SELECT COALESCE(SUM(cost_usd), 0) FROM attempts
                         WHERE attempts.run_id = runs.run_id);
        ALTER TABLE jobs ADD COLUMN video_uri TEXT;
        ALTER TABLE jobs ADD COLUMN video_etag TEXT;
        ALTER TABLE attempts ADD COLUMN video_uri TEXT;
        ALTER TABLE attempts ADD COLUMN video_size INTEGER;
        ALTER TABLE attempts ADD COLUMN video_sha256 TEXT;
        ALTER TABLE attempts ADD COLUMN video_etag TEXT;
        DROP TRIGGER IF EXISTS job_new_attempt;
        DROP TRIGGER IF EXISTS job_transition;
    """,
    3: """
        ALTER TABLE jobs ADD COLUMN reserved_units REAL NOT NULL DEFAULT 0;
        ALTER TABLE jobs ADD COLUMN price_group TEXT;
        ALTER TABLE jobs ADD COLUMN reused_from TEXT;
        ALTER TABLE runs ADD COLUMN reserved_units REAL NOT NULL DEFAULT 0;
        ALTER TABLE runs ADD COLUMN spent_units REAL NOT NULL DEFAULT 0;
        UPDATE runs SET spent_units = (SELECT COALESCE(SUM(cost_units), 0) FROM attempts
                                       WHERE attempts.run_id = runs.run_id);
        DROP TRIGGER IF EXISTS attempt_cost;
        DROP TRIGGER IF EXISTS attempt_cost_new;
    """,
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- A run's reserved_usd and spent_usd are running totals kept by the triggers below, so a claim
-- checks the budget, and a progress display reads the money, without a scan. (Comments stay
-- outside CREATE TABLE: SQLite keeps the statement's text and rewrites it on ALTER TABLE.)
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    manifest_path TEXT,
    manifest_text TEXT,
    config_json TEXT NOT NULL,
    provider TEXT NOT NULL,
    base_url TEXT NOT NULL,
    simulated INTEGER NOT NULL DEFAULT 0,
    nonce TEXT NOT NULL,
    state TEXT NOT NULL,
    stop_reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    lease_owner TEXT,
    lease_pid INTEGER,
    lease_host TEXT,
    lease_heartbeat REAL,
    reserved_usd REAL NOT NULL DEFAULT 0,
    spent_usd REAL NOT NULL DEFAULT 0,
    reserved_units REAL NOT NULL DEFAULT 0,
    spent_units REAL NOT NULL DEFAULT 0
);
-- A job's account_id is the account whose slot its task holds, worker_id the worker driving
-- it, and claim_epoch the epoch every write of that worker must still match (a worker
-- presumed dead is fenced off). price_group names the jobs that cost the same (the claim sets
-- it with the reservation), reused_from the run/job whose video a reused job took.
CREATE TABLE IF NOT EXISTS jobs (
    run_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    spec_json TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    attempt_base INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    task_id TEXT,
    progress REAL,
    video_url TEXT,
    video_path TEXT,
    video_size INTEGER,
    video_sha256 TEXT,
    cost_usd REAL,
    cost_units REAL,
    reserved_usd REAL NOT NULL DEFAULT 0,
    error_code TEXT,
    error_message TEXT,
    retryable INTEGER,
    submitted_at REAL,
    completed_at REAL,
    render_seconds REAL,
    updated_at REAL NOT NULL,
    last_event TEXT,
    last_event_data TEXT,
    account_id TEXT,
    worker_id TEXT,
    claim_epoch INTEGER NOT NULL DEFAULT 0,
    video_uri TEXT,
    video_etag TEXT,
    reserved_units REAL NOT NULL DEFAULT 0,
    price_group TEXT,
    reused_from TEXT,
    PRIMARY KEY (run_id, job_id)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (run_id, state, seq);
-- "A downloaded job with this fingerprint in another run" (reuse: earlier-runs, plan). Not
-- (fingerprint, state): a fingerprint changes only when a manifest does, so transitions never
-- touch this index.
CREATE INDEX IF NOT EXISTS jobs_by_fingerprint ON jobs (fingerprint);
-- What the provider charged for the last finished task of each price group, across runs:
-- a run reserves at least this much for the group's next task.
CREATE TABLE IF NOT EXISTS prices (
    price_group TEXT PRIMARY KEY,
    usd REAL,
    units REAL,
    samples INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_account ON jobs (account_id, state);
CREATE INDEX IF NOT EXISTS jobs_by_worker ON jobs (worker_id, state);
-- A provider key, named by its environment variable (never its value), and its task slots:
-- the limit discovered from rejections and a pause from Retry-After, shared by every worker.
CREATE TABLE IF NOT EXISTS accounts (
    account_id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    max_in_flight INTEGER NOT NULL,
    slot_limit INTEGER NOT NULL,
    streak INTEGER NOT NULL DEFAULT 0,
    paused_until REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
-- Every process that drives jobs. ``beat`` is on the store's clock (a host-wide monotonic
-- clock here, with ``boot_id`` telling boots apart); ``heartbeat_at`` is wall time, for people.
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    boot_id TEXT NOT NULL,
    state TEXT NOT NULL,
    runs TEXT,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    beat REAL NOT NULL,
    stop_reason TEXT
);
-- Paging through every job of a run in manifest order (the CSV, the report). A transition
-- does not change seq, so it never touches this index.
CREATE INDEX IF NOT EXISTS jobs_by_seq ON jobs (run_id, seq);
-- Which job holds a provider task (Store.task_owner). Only statements that set task_id touch it.
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (task_id) WHERE task_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    task_id TEXT,
    submitted_at REAL,
    completed_at REAL,
    cost_usd REAL,
    cost_units REAL,
    error_code TEXT,
    error_message TEXT,
    video_uri TEXT,
    video_size INTEGER,
    video_sha256 TEXT,
    video_etag TEXT,
    PRIMARY KEY (run_id, job_id, number)
);
-- No AUTOINCREMENT: ids still only grow (events are never deleted), and each insert does not
-- also rewrite sqlite_sequence. Files made before keep it; both read the same.
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    job_id TEXT,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, id);
-- Transitions set jobs.last_event; only they fire these (resets and syncs do not touch history).
CREATE TRIGGER IF NOT EXISTS job_new_attempt AFTER UPDATE OF last_event ON jobs
WHEN NEW.attempt > OLD.attempt
BEGIN
    INSERT INTO attempts (run_id, job_id, number, idempotency_key, fingerprint, state, task_id,
                          submitted_at, completed_at, cost_usd, cost_units, error_code,
                          error_message, video_uri, video_size, video_sha256, video_etag)
    VALUES (NEW.run_id, NEW.job_id, NEW.attempt, NEW.idempotency_key, NEW.fingerprint,
            NEW.state, NEW.task_id, NEW.submitted_at, NEW.completed_at, NEW.cost_usd,
            NEW.cost_units, NEW.error_code, NEW.error_message, NEW.video_uri, NEW.video_size,
            NEW.video_sha256, NEW.video_etag);
END;
-- The run's money totals follow the jobs' reservations and the attempts' reported costs.
CREATE TRIGGER IF NOT EXISTS job_reserved AFTER UPDATE OF reserved_usd ON jobs
WHEN NEW.reserved_usd IS NOT OLD.reserved_usd
BEGIN
    UPDATE runs SET reserved_usd = reserved_usd + NEW.reserved_usd - OLD.reserved_usd
    WHERE run_id = NEW.run_id;
END;
CREATE TRIGGER IF NOT EXISTS job_reserved_units AFTER UPDATE OF reserved_units ON jobs
WHEN NEW.reserved_units IS NOT OLD.reserved_units
BEGIN
    UPDATE runs SET reserved_units = reserved_units + NEW.reserved_units - OLD.reserved_units
    WHERE run_id = NEW.run_id;
END;
CREATE TRIGGER IF NOT EXISTS attempt_cost AFTER UPDATE OF cost_usd, cost_units ON attempts
WHEN NEW.cost_usd IS NOT OLD.cost_usd OR NEW.cost_units IS NOT OLD.cost_units
BEGIN
    UPDATE runs SET spent_usd = spent_usd + COALESCE(NEW.cost_usd, 0) - COALESCE(OLD.cost_usd, 0),
        spent_units = spent_units + COALESCE(NEW.cost_units, 0) - COALESCE(OLD.cost_units, 0)
    WHERE run_id = NEW.run_id;
END;
CREATE TRIGGER IF NOT EXISTS attempt_cost_new AFTER INSERT ON attempts
WHEN NEW.cost_usd IS NOT NULL OR NEW.cost_units IS NOT NULL
BEGIN
    UPDATE runs SET spent_usd = spent_usd + COALESCE(NEW.cost_usd, 0),
        spent_units = spent_units + COALESCE(NEW.cost_units, 0) WHERE run_id = NEW.run_id;
END;
CREATE TRIGGER IF NOT EXISTS job_transition AFTER UPDATE OF last_event ON jobs
BEGIN
    UPDATE attempts SET state = NEW.state, task_id = NEW.task_id,
        submitted_at = NEW.submitted_at, completed_at = NEW.completed_at,
        cost_usd = NEW.cost_usd, cost_units = NEW.cost_units, error_code = NEW.error_code,
        error_message = NEW.error_message, video_uri = NEW.video_uri,
        video_size = NEW.video_size, video_sha256 = NEW.video_sha256, video_etag = NEW.video_etag
    WHERE run_id = NEW.run_id AND job_id = NEW.job_id AND number = NEW.attempt;
    INSERT INTO events (run_id, job_id, at, event, data)
    VALUES (NEW.run_id, NEW.job_id, NEW.updated_at, NEW.last_event, NEW.last_event_data);
END;
"""
