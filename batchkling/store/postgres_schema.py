"""The PostgreSQL store's schema: its tables, indexes and triggers, and their versions.

The shape is SQLite's (``sqlite_schema``), with PostgreSQL's types: times are epoch seconds in
``double precision`` (what every backend hands back), flags ``boolean``, sizes ``bigint``, event
data ``jsonb`` (so an operator can query it: ``data->>'from'``). Runs own their jobs and jobs
their attempts (``ON DELETE CASCADE``); events carry no foreign key, so appending one takes no
lock on the run's row.

Every job state change is one ``UPDATE`` of its ``jobs`` row that sets ``last_event``; the
triggers do the rest inside that one statement: a new attempt number inserts the attempt's row,
any other transition mirrors the attempt's fields onto it, an event is appended, and the run's
running money totals (``reserved_usd``, ``spent_usd``) follow the job's reservation and the
attempt's reported cost — so a claim checks the budget, and a progress display reads the money,
without a scan.

Versions are PostgreSQL's own (they do not follow SQLite's). ``MIGRATIONS[v]`` takes a schema
at version ``v`` to ``v + 1``; ``SCHEMA`` then (re)creates what is missing and replaces every
function. A function whose arguments change is dropped by its migration step: ``CREATE OR
REPLACE`` would add an overload beside the old one. The one exception is on purpose: schema 3's
claim functions come back as thin wrappers of the new ones, so that workers of an earlier
release keep claiming while a newer one upgrades the database under them.
"""

from __future__ import annotations

SCHEMA_VERSION = 5

#: Taken with ``pg_advisory_xact_lock`` while the schema is created or migrated, so workers
#: opening the same database at once wait for each other instead of racing. ("bkschema")
SCHEMA_LOCK = 0x626B736368656D61

#: Money (docs/money.md): Kling units reserved per job, the job's price group and where a reused
#: video came from; what the provider last charged per price group, kept across runs; and the
#: index behind "a downloaded job with this fingerprint in another run". Idempotent; ``SCHEMA``
#: has all of it for a new database.
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

#: Steps from each older schema version to the next. Version 1 had no money in units, price
#: groups, reuse or observed prices (``MONEY_SCHEMA``). Version 2 had no accounts, workers or
#: claims (the run's lease kept its own pid, host and heartbeat; now they are the holder
#: worker's), no running money totals on the run, and no object-store columns (``video_uri``,
#: ``video_etag``; the attempt's video). The trigger functions are replaced by ``SCHEMA``.
#: Version 3's claim functions took no credit (``p_credit``, the caller's own tasks known to
#: have ended): their old signatures are dropped, so that ``SCHEMA`` creates the new ones, and
#: then the old signatures again as wrappers of the new (version 5). Version 4 had no such
#: wrappers: a worker of the release before it failed its next claim once a newer process had
#: opened the database; now it claims on, with no credit, until it is restarted.
MIGRATIONS: dict[int, str] = {
    1: MONEY_SCHEMA,
    2: """
        ALTER TABLE runs ADD COLUMN reserved_usd double precision NOT NULL DEFAULT 0,
            ADD COLUMN spent_usd double precision NOT NULL DEFAULT 0,
            ADD COLUMN reserved_units double precision NOT NULL DEFAULT 0,
            ADD COLUMN spent_units double precision NOT NULL DEFAULT 0,
            DROP COLUMN lease_pid, DROP COLUMN lease_host, DROP COLUMN lease_heartbeat;
        UPDATE runs SET
            reserved_usd = (SELECT COALESCE(SUM(reserved_usd), 0) FROM jobs
                            WHERE jobs.run_id = runs.run_id),
            reserved_units = (SELECT COALESCE(SUM(reserved_units), 0) FROM jobs
                              WHERE jobs.run_id = runs.run_id),
            spent_usd = (SELECT COALESCE(SUM(cost_usd), 0) FROM attempts
                         WHERE attempts.run_id = runs.run_id),
            spent_units = (SELECT COALESCE(SUM(cost_units), 0) FROM attempts
                           WHERE attempts.run_id = runs.run_id);
        ALTER TABLE jobs ADD COLUMN account_id text, ADD COLUMN worker_id text,
            ADD COLUMN claim_epoch integer NOT NULL DEFAULT 0,
            ADD COLUMN video_uri text, ADD COLUMN video_etag text;
        ALTER TABLE attempts ADD COLUMN video_uri text, ADD COLUMN video_size bigint,
            ADD COLUMN video_sha256 text, ADD COLUMN video_etag text;
    """,
    3: """
        DROP FUNCTION IF EXISTS batchkling_claim_pick(text, text, text, integer,
            double precision, text[], integer);
        DROP FUNCTION IF EXISTS batchkling_claim_take(text, text, text, integer,
            double precision, double precision, double precision, double precision,
            double precision, text[]);
    """,
    4: "",  # SCHEMA adds the wrappers of schema 3's signatures
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);
-- The lease's holder is a worker (its pid, host and heartbeat are in workers). reserved_usd
-- and spent_usd are running totals the triggers below keep.
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
    reserved_usd double precision NOT NULL DEFAULT 0,
    spent_usd double precision NOT NULL DEFAULT 0,
    reserved_units double precision NOT NULL DEFAULT 0,
    spent_units double precision NOT NULL DEFAULT 0
);
-- Room on each page for a row's next version: a transition that keeps the state (a progress
-- update) can then be a heap-only update, with no new index entries. A job's account_id is
-- the account whose slot its task holds, worker_id the worker driving it, and claim_epoch the
-- epoch every write of that worker must still match (a worker presumed dead is fenced off).
-- price_group names the jobs that cost the same (the claim sets it with the reservation),
-- reused_from the run/job whose video a reused job took.
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
    account_id text,
    worker_id text,
    claim_epoch integer NOT NULL DEFAULT 0,
    video_uri text,
    video_etag text,
    reserved_units double precision NOT NULL DEFAULT 0,
    price_group text,
    reused_from text,
    PRIMARY KEY (run_id, job_id)
) WITH (fillfactor = 80);
-- Pages of a run's jobs in some states, in manifest order (jobs_in, counts, the next pending
-- job of a claim); an account's tasks in flight (a claim's slot count); a worker's jobs.
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (run_id, state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_account ON jobs (account_id, state);
CREATE INDEX IF NOT EXISTS jobs_by_worker ON jobs (worker_id, state);
-- Every job of a run in manifest order (the CSV, the report); which job holds a provider task
-- (Store.task_owner); a downloaded job with this fingerprint in another run (reuse, plan).
CREATE INDEX IF NOT EXISTS jobs_by_seq ON jobs (run_id, seq);
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (task_id) WHERE task_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_fingerprint ON jobs (fingerprint);
-- What the provider charged for the last finished task of each price group, across runs: a
-- run reserves at least this much for the group's next task.
CREATE TABLE IF NOT EXISTS prices (
    price_group text PRIMARY KEY,
    usd double precision,
    units double precision,
    samples integer NOT NULL DEFAULT 0,
    updated_at double precision NOT NULL
);
-- A provider key, named by its environment variable (never its value), and its task slots:
-- the limit discovered from rejections and a pause from Retry-After, shared by every worker.
-- paused_until is on the store's clock (the server's, see PostgresStore).
CREATE TABLE IF NOT EXISTS accounts (
    account_id text PRIMARY KEY,
    provider text NOT NULL,
    max_in_flight integer NOT NULL,
    slot_limit integer NOT NULL,
    streak integer NOT NULL DEFAULT 0,
    paused_until double precision NOT NULL DEFAULT 0,
    updated_at double precision NOT NULL
);
-- Every process that drives jobs. beat is on the store's clock (the server's); heartbeat_at
-- is the worker's wall time, for people; host, boot_id and pid tell a process gone from a
-- host at once.
CREATE TABLE IF NOT EXISTS workers (
    worker_id text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    boot_id text NOT NULL,
    state text NOT NULL,
    runs jsonb,
    started_at double precision NOT NULL,
    heartbeat_at double precision NOT NULL,
    beat double precision NOT NULL,
    stop_reason text
);
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
    video_uri text,
    video_size bigint,
    video_sha256 text,
    video_etag text,
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
                              error_code, error_message, video_uri, video_size, video_sha256,
                              video_etag)
        VALUES (NEW.run_id, NEW.job_id, NEW.attempt, NEW.idempotency_key, NEW.fingerprint,
                NEW.state, NEW.task_id, NEW.submitted_at, NEW.completed_at, NEW.cost_usd,
                NEW.cost_units, NEW.error_code, NEW.error_message, NEW.video_uri,
                NEW.video_size, NEW.video_sha256, NEW.video_etag);
    ELSE
        UPDATE attempts SET state = NEW.state, task_id = NEW.task_id,
            submitted_at = NEW.submitted_at, completed_at = NEW.completed_at,
            cost_usd = NEW.cost_usd, cost_units = NEW.cost_units, error_code = NEW.error_code,
            error_message = NEW.error_message, video_uri = NEW.video_uri,
            video_size = NEW.video_size, video_sha256 = NEW.video_sha256,
            video_etag = NEW.video_etag
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

-- The run's money totals follow the jobs' reservations and the attempts' reported costs, in
-- USD and in provider units.
CREATE OR REPLACE FUNCTION batchkling_job_reserved() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE runs SET reserved_usd = reserved_usd + NEW.reserved_usd - OLD.reserved_usd,
        reserved_units = reserved_units + NEW.reserved_units - OLD.reserved_units
    WHERE run_id = NEW.run_id;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS job_reserved ON jobs;
CREATE TRIGGER job_reserved AFTER UPDATE OF reserved_usd, reserved_units ON jobs
FOR EACH ROW WHEN (NEW.reserved_usd IS DISTINCT FROM OLD.reserved_usd
                   OR NEW.reserved_units IS DISTINCT FROM OLD.reserved_units)
EXECUTE FUNCTION batchkling_job_reserved();
CREATE OR REPLACE FUNCTION batchkling_attempt_cost() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        UPDATE runs SET
            spent_usd = spent_usd + COALESCE(NEW.cost_usd, 0) - COALESCE(OLD.cost_usd, 0),
            spent_units = spent_units + COALESCE(NEW.cost_units, 0) - COALESCE(OLD.cost_units, 0)
        WHERE run_id = NEW.run_id;
    ELSE
        UPDATE runs SET spent_usd = spent_usd + COALESCE(NEW.cost_usd, 0),
            spent_units = spent_units + COALESCE(NEW.cost_units, 0)
        WHERE run_id = NEW.run_id;
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS attempt_cost ON attempts;
CREATE TRIGGER attempt_cost AFTER UPDATE OF cost_usd, cost_units ON attempts
FOR EACH ROW WHEN (NEW.cost_usd IS DISTINCT FROM OLD.cost_usd
                   OR NEW.cost_units IS DISTINCT FROM OLD.cost_units)
EXECUTE FUNCTION batchkling_attempt_cost();
DROP TRIGGER IF EXISTS attempt_cost_new ON attempts;
CREATE TRIGGER attempt_cost_new AFTER INSERT ON attempts
FOR EACH ROW WHEN (NEW.cost_usd IS NOT NULL OR NEW.cost_units IS NOT NULL)
EXECUTE FUNCTION batchkling_attempt_cost();

-- An account's tasks that hold its slots: jobs in a slot state (the claim passes
-- interface.SLOT_STATES) of an open run, or driven by a live worker. (A run that was stopped and
-- that nobody drives leaves its last tasks in flight in the store; they do not hold the
-- account's slots forever.) Called as its own statement, it sees what committed before it.
CREATE OR REPLACE FUNCTION batchkling_in_flight(p_account text, p_slot_states text[])
RETURNS integer LANGUAGE sql AS $$
    SELECT count(*)::integer FROM jobs f
    WHERE f.account_id = p_account AND f.state = ANY(p_slot_states)
    AND (f.run_id IN (SELECT r.run_id FROM runs r WHERE r.state = 'running')
         OR f.worker_id IN (SELECT w.worker_id FROM workers w WHERE w.state = 'alive'))
$$;
-- A claim (PostgresStore.claim) is two calls in one transaction, whose statements keep their
-- plans in the session. batchkling_claim_pick reads without locking what the claim decides on
-- (the worker, the account's limit and pause, the run and its committed money, the account's
-- tasks in flight) and, only when a job may be taken (open run, no pause, a free slot), locks
-- the run's next pending job, skipping jobs other claims have locked; it leaves the job's id
-- in the transaction's setting batchkling.claim_job. It also limits how long the transaction
-- may sit idle. Both functions count p_credit fewer tasks in flight for the slot check (the
-- caller's own tasks it knows have ended, held between 0 and the count: Store.claim's
-- credit), and return the count before it.
CREATE OR REPLACE FUNCTION batchkling_claim_pick(
    p_worker text, p_account text, p_run text, p_cap integer, p_clock double precision,
    p_slot_states text[], p_idle_ms integer, p_credit integer)
RETURNS TABLE (worker_state text, slot_limit integer, paused_for double precision,
               run_state text, committed double precision, committed_units double precision,
               in_flight integer, pending boolean, job_id text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('idle_in_transaction_session_timeout', p_idle_ms::text, true);
    SELECT w.state INTO worker_state FROM workers w WHERE w.worker_id = p_worker;
    SELECT a.slot_limit, a.paused_until - COALESCE(p_clock, extract(epoch FROM
           clock_timestamp())) INTO slot_limit, paused_for
    FROM accounts a WHERE a.account_id = p_account;
    SELECT r.state, r.spent_usd + r.reserved_usd, r.spent_units + r.reserved_units
    INTO run_state, committed, committed_units FROM runs r WHERE r.run_id = p_run;
    in_flight := batchkling_in_flight(p_account, p_slot_states);
    IF run_state = 'running' AND paused_for <= 0
       AND in_flight - least(greatest(p_credit, 0), in_flight) < least(p_cap, slot_limit) THEN
        SELECT j.job_id INTO job_id FROM jobs j WHERE j.run_id = p_run AND j.state = 'pending'
        ORDER BY j.seq LIMIT 1 FOR UPDATE SKIP LOCKED;
    END IF;
    pending := job_id IS NOT NULL OR EXISTS (
        SELECT 1 FROM jobs j WHERE j.run_id = p_run AND j.state = 'pending');
    PERFORM set_config('batchkling.claim_job', COALESCE(job_id, ''), true);
    RETURN NEXT;
END
$$;
-- batchkling_claim_take decides for the picked job under the locks, all on the server: it
-- locks the account's row (claimers of one account take turns, each for the length of this
-- call and the update after it, never for a round trip), and the run's when a budget applies;
-- counts the account's tasks in flight after the lock, so every earlier claim is counted; and
-- checks the worker, the run, the pause, the slots and the budgets (USD and units). Its
-- outcome is 'claimed' (then batchkling.claim_ok is 'yes' for the update that follows), or
-- what stopped it.
CREATE OR REPLACE FUNCTION batchkling_claim_take(
    p_worker text, p_account text, p_run text, p_cap integer, p_max_usd double precision,
    p_usd double precision, p_max_units double precision, p_units double precision,
    p_clock double precision, p_slot_states text[], p_credit integer)
RETURNS TABLE (outcome text, slot_limit integer, paused_for double precision,
               in_flight integer, committed double precision,
               committed_units double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_worker text;
    v_run text;
BEGIN
    SELECT a.slot_limit, a.paused_until - COALESCE(p_clock, extract(epoch FROM
           clock_timestamp())) INTO slot_limit, paused_for
    FROM accounts a WHERE a.account_id = p_account FOR UPDATE;
    IF p_max_usd IS NULL AND p_max_units IS NULL THEN
        SELECT r.state, r.spent_usd + r.reserved_usd, r.spent_units + r.reserved_units
        INTO v_run, committed, committed_units FROM runs r WHERE r.run_id = p_run;
    ELSE
        SELECT r.state, r.spent_usd + r.reserved_usd, r.spent_units + r.reserved_units
        INTO v_run, committed, committed_units FROM runs r WHERE r.run_id = p_run FOR UPDATE;
    END IF;
    in_flight := batchkling_in_flight(p_account, p_slot_states);
    SELECT w.state INTO v_worker FROM workers w WHERE w.worker_id = p_worker;
    outcome := CASE
        WHEN v_worker IS DISTINCT FROM 'alive' THEN 'fenced'
        WHEN v_run IS DISTINCT FROM 'running' THEN 'closed'
        WHEN paused_for > 0 THEN 'paused'
        WHEN in_flight - least(greatest(p_credit, 0), in_flight) >= least(p_cap, slot_limit)
            THEN 'no_slot'
        WHEN p_max_usd IS NOT NULL AND committed + p_usd > p_max_usd + 1e-9 THEN 'budget'
        WHEN p_max_units IS NOT NULL AND committed_units + p_units > p_max_units + 1e-9
            THEN 'budget_units'
        ELSE 'claimed' END;
    PERFORM set_config('batchkling.claim_ok', CASE WHEN outcome = 'claimed' THEN 'yes'
                       ELSE 'no' END, true);
    RETURN NEXT;
END
$$;
-- Schema 3's signatures, without the credit: a worker of an earlier release that was running
-- when this release upgraded the database still claims, with no credit, as it did (a rolling
-- upgrade). The decisions stay in the functions above.
CREATE OR REPLACE FUNCTION batchkling_claim_pick(
    p_worker text, p_account text, p_run text, p_cap integer, p_clock double precision,
    p_slot_states text[], p_idle_ms integer)
RETURNS TABLE (worker_state text, slot_limit integer, paused_for double precision,
               run_state text, committed double precision, committed_units double precision,
               in_flight integer, pending boolean, job_id text)
LANGUAGE sql AS $$
    SELECT * FROM batchkling_claim_pick(p_worker, p_account, p_run, p_cap, p_clock,
                                        p_slot_states, p_idle_ms, 0)
$$;
CREATE OR REPLACE FUNCTION batchkling_claim_take(
    p_worker text, p_account text, p_run text, p_cap integer, p_max_usd double precision,
    p_usd double precision, p_max_units double precision, p_units double precision,
    p_clock double precision, p_slot_states text[])
RETURNS TABLE (outcome text, slot_limit integer, paused_for double precision,
               in_flight integer, committed double precision,
               committed_units double precision)
LANGUAGE sql AS $$
    SELECT * FROM batchkling_claim_take(p_worker, p_account, p_run, p_cap, p_max_usd, p_usd,
                                        p_max_units, p_units, p_clock, p_slot_states, 0)
$$;
"""
