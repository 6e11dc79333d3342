"""The PostgreSQL store's schema: its tables, indexes and trigger, and their versions.

The shape is SQLite's (``sqlite_schema``), with PostgreSQL's types: times are epoch seconds in
``double precision`` (what every backend hands back), flags ``boolean``, sizes ``bigint``, event
data ``jsonb`` (so an operator can query it: ``data->>'from'``). Runs own their jobs and jobs
their attempts (``ON DELETE CASCADE``); events carry no foreign key, so appending one takes no
lock on the run's row, which every worker's transitions would otherwise share.

Every job state change is one ``UPDATE`` of its ``jobs`` row that sets ``last_event``; the
trigger does the rest inside that one statement: a new attempt number inserts the attempt's row,
any other transition mirrors the attempt's fields onto it, and an event is appended.

Versions are PostgreSQL's own (they do not follow SQLite's). ``MIGRATIONS[v]`` takes a schema
at version ``v`` to ``v + 1``; ``SCHEMA`` then (re)creates what is missing.
"""

from __future__ import annotations

SCHEMA_VERSION = 2

#: Taken with ``pg_advisory_xact_lock`` while the schema is created or migrated, so workers
#: opening the same database at once wait for each other instead of racing. ("bkschema")
SCHEMA_LOCK = 0x626B736368656D61

#: Steps from each older schema version to the next. Version 1 had no money in units, price
#: groups, reuse or observed prices: ``MONEY_SCHEMA`` (part of ``SCHEMA``) adds them, idempotently.
MIGRATIONS: dict[int, str] = {1: ""}

#: Money (docs/money.md): Kling units reserved per job, the job's price group and where a reused
#: video came from; what the provider last charged per price group, kept across runs; and the
#: index behind "a downloaded job with this fingerprint in another run". Every statement is
#: idempotent, so this block is re-run safely by whichever migration reaches it.
MONEY_SCHEMA = """
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS reserved_units double precision NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS price_group text;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS reused_from text;
CREATE INDEX IF NOT EXISTS jobs_by_fingerprint ON jobs (fingerprint);
CREATE TABLE IF NOT EXISTS prices (
    price_group text PRIMARY KEY,
    usd double precision,
    units double precision,
    samples integer NOT NULL DEFAULT 0,
    updated_at double precision NOT NULL
);
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id text PRIMARY KEY,
    manifest_path text,
    manifest_text text,
    config_json text NOT NULL,
    provider text NOT NULL,
    base_url text NOT NULL,
    simulated boolean NOT NULL DEFAULT false,
    nonce text NOT NULL,
    state text NOT NULL,
    stop_reason text,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    lease_owner text,
    lease_pid integer,
    lease_host text,
    -- Stamped by the database's clock, never the runner's: see PostgresStore.acquire_lease.
    lease_heartbeat double precision
);
-- Room on each page for a row's next version: a transition that keeps the state (a progress
-- update) can then be a heap-only update, with no new index entries.
CREATE TABLE IF NOT EXISTS jobs (
    run_id text NOT NULL REFERENCES runs ON DELETE CASCADE,
    job_id text NOT NULL,
    seq integer NOT NULL,
    spec_json text NOT NULL,
    fingerprint text NOT NULL,
    state text NOT NULL,
    attempt integer NOT NULL DEFAULT 0,
    attempt_base integer NOT NULL DEFAULT 0,
    idempotency_key text,
    task_id text,
    progress double precision,
    video_url text,
    video_path text,
    video_size bigint,
    video_sha256 text,
    cost_usd double precision,
    cost_units double precision,
    reserved_usd double precision NOT NULL DEFAULT 0,
    error_code text,
    error_message text,
    retryable boolean,
    submitted_at double precision,
    completed_at double precision,
    render_seconds double precision,
    updated_at double precision NOT NULL,
    last_event text,
    last_event_data jsonb,
    PRIMARY KEY (run_id, job_id)
) WITH (fillfactor = 80);
-- Pages of a run's jobs in some states, in manifest order (jobs_in, counts, the engine's feed).
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (run_id, state, seq);
-- Which job holds a provider task (Store.task_owner).
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (task_id) WHERE task_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS attempts (
    run_id text NOT NULL,
    job_id text NOT NULL,
    number integer NOT NULL,
    idempotency_key text NOT NULL,
    fingerprint text NOT NULL,
    state text NOT NULL,
    task_id text,
    submitted_at double precision,
    completed_at double precision,
    cost_usd double precision,
    cost_units double precision,
    error_code text,
    error_message text,
    PRIMARY KEY (run_id, job_id, number),
    FOREIGN KEY (run_id, job_id) REFERENCES jobs ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id text NOT NULL,
    job_id text,
    at double precision NOT NULL,
    event text NOT NULL,
    data jsonb
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, id);

-- Transitions set jobs.last_event; only they fire this (resets and syncs do not touch history).
CREATE OR REPLACE FUNCTION batchkling_job_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.attempt > OLD.attempt THEN
        INSERT INTO attempts (run_id, job_id, number, idempotency_key, fingerprint, state,
                              task_id, submitted_at, completed_at, cost_usd, cost_units,
                              error_code, error_message)
        VALUES (NEW.run_id, NEW.job_id, NEW.attempt, NEW.idempotency_key, NEW.fingerprint,
                NEW.state, NEW.task_id, NEW.submitted_at, NEW.completed_at, NEW.cost_usd,
                NEW.cost_units, NEW.error_code, NEW.error_message);
    ELSE
        UPDATE attempts SET state = NEW.state, task_id = NEW.task_id,
            submitted_at = NEW.submitted_at, completed_at = NEW.completed_at,
            cost_usd = NEW.cost_usd, cost_units = NEW.cost_units, error_code = NEW.error_code,
            error_message = NEW.error_message
        WHERE run_id = NEW.run_id AND job_id = NEW.job_id AND number = NEW.attempt;
    END IF;
    INSERT INTO events (run_id, job_id, at, event, data)
    VALUES (NEW.run_id, NEW.job_id, NEW.updated_at, NEW.last_event, NEW.last_event_data);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS job_transition ON jobs;
CREATE TRIGGER job_transition AFTER UPDATE OF last_event ON jobs
FOR EACH ROW EXECUTE FUNCTION batchkling_job_transition();
""" + MONEY_SCHEMA
