"""The command line. The only module that prints, configures logging and chooses exit codes."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import click

from batchkling.errors import (
    BatchklingError,
    ConfigError,
    ManifestError,
    RunLocked,
    RunNotFound,
    StoreError,
    StoreRefused,
    WorkerFenced,
    unwrapped_groups,
)

EXIT_OK = 0
EXIT_FAILED_JOBS = 1
EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 3
EXIT_ACCOUNT = 4
EXIT_FENCED = 5
EXIT_INTERRUPTED = 130

#: ``--simulate`` compresses time by this factor: a 90 s render takes 1.5 s.
SIMULATE_SPEED = 60.0
#: The key ``--simulate`` puts in the environment for the run: the simulator accepts any key.
#: No words in it: every piece of a key is redacted from output, and "simulated" is a word.
SIMULATE_KEY = "sk-sim-0c7f3a9e1b5d2846"

_T = TypeVar("_T")
WORKDIR = click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), envvar="BATCHKLING_HOME",
    default=Path("jobs"), show_default=True, show_envvar=True,
    help="Where the run folders live, and the state DB unless --store names another.",
)

STORE = click.option(
    "--store", metavar="PATH|URL", envvar="BATCHKLING_STORE", show_envvar=True,
    help="The state store: a SQLite file (default: <workdir>/batchkling.db) or a "
    "postgresql://user@host/db URL that many machines share (password from PGPASSWORD or "
    "~/.pgpass). Run folders stay in the workdir.",
)

def _duration(ctx: click.Context, param: click.Parameter, value: Any) -> float:
    """``--stale-after``: seconds, or a duration like 30s, 2m, 1h30m."""
    from batchkling.manifest.settings import _seconds

    try:
        seconds = float(_seconds(value))
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    if not 1 <= seconds <= 86400:
        raise click.BadParameter(f"{value!r}: give between 1s and 24h", ctx, param)
    return seconds


STALE_AFTER = click.option(
    "--stale-after", callback=_duration, default="30s", show_default=True, metavar="DURATION",
    help="A worker silent this long is presumed dead and its jobs are taken over.",
)

SPEED = click.option(
    "--speed", type=click.FloatRange(min=1), default=None,
    help="How much faster than real renders are: with --simulate (default 60), or for a "
    "simulator started with `batchkling simulate --speed X`. Polls and deadlines shrink with it.",
)
#: ``resume`` and ``retry`` take no --simulate: a simulated run is resumed against a simulator.
RESUME_SPEED = click.option(
    "--speed", type=click.FloatRange(min=1), default=None,
    help="How much faster than real renders are, for a run against a simulator (a simulated "
    "run defaults to 60). Polls and deadlines shrink with it.",
)

#: What the simulator's named fault profiles do, for ``simulate --help``.
FAULT_PROFILES = {
    "none": "no faults (default)",
    "quirks": "the response quirks real gateways show (status synonyms, wrapped bodies, "
              "string progress, millisecond timestamps, a 404 right after create)",
    "flaky": "5xx and dropped polls, rate limits, 10% failed tasks, truncated downloads, "
             "expiring URLs",
    "slots": "an account of 3 task slots",
    "overpriced": "bills 60% above the price table (a budget must hold anyway)",
    "chaos": "quirks + flaky + 8 slots, hanging creates and tasks that never finish",
}

#: Shared by every command that runs jobs (``run``; workers too).
OUTPUT_STORE = click.option(
    "--output-store", metavar="s3://BUCKET/PREFIX/", default=None,
    help="Put each verified video in this S3-compatible bucket (overrides output.store; "
    "credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE).",
)


CALLBACK_LISTEN = click.option(
    "--callback-listen", metavar="HOST:PORT",
    help="Receive the provider's status callbacks here (the manifest's provider.callback_url "
    "must be the public URL that reaches it): tasks are then polled far less.",
)


def _fail(message: str, code: int) -> NoReturn:
    from batchkling.logs import redactor

    # A provider's words can reach an error message: no credential is printed with them.
    click.echo(f"batchkling: error: {redactor.scrub_text(message)}", err=True)
    sys.exit(code)


def _report_manifest_error(exc: ManifestError) -> NoReturn:
    for problem in exc.problems:
        click.echo(f"error: {problem}", err=True)
    n = len(exc.problems)
    click.echo(
        f"batchkling: {n} problem{'s' if n != 1 else ''} in the manifest; nothing was submitted.",
        err=True,
    )
    sys.exit(EXIT_BAD_INPUT)


@contextmanager
def _errors_to_exit_codes() -> Iterator[None]:
    """Turn batchkling's exceptions into one clear line and the documented exit code."""
    try:
        yield
    except ManifestError as exc:
        _report_manifest_error(exc)
    except (ConfigError, RunNotFound) as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except RunLocked as exc:
        _fail(str(exc), EXIT_INCOMPLETE)
    except WorkerFenced as exc:
        _fail(str(exc), EXIT_FENCED)
    except StoreRefused as exc:  # the store's setup is wrong (login, database, newer schema)
        _fail(str(exc), EXIT_BAD_INPUT)
    except StoreError as exc:
        _fail(str(exc), EXIT_INCOMPLETE)
    except BatchklingError as exc:
        _fail(str(exc), EXIT_FAILED_JOBS)
    except Exception as exc:
        if os.environ.get("BATCHKLING_DEBUG"):
            raise
        from batchkling.logs import redactor

        _fail(f"internal error: {redactor.scrub_text(f'{type(exc).__name__}: {exc}')} — this is a "
              "bug; set BATCHKLING_DEBUG=1 to see the traceback and please report it. The "
              "state database is consistent: `resume` continues the run.", EXIT_FAILED_JOBS)


def _location(workdir: Path, store: str | None) -> str:
    """The store a command uses: ``--store``, else the workdir's own SQLite file."""
    from batchkling.store import default_location

    return store or str(default_location(workdir))


def _store_exists(workdir: Path, store: str | None) -> bool:
    from batchkling.store import store_exists

    location = _location(workdir, store)
    return _run_async(lambda: store_exists(location))


def _require_db(workdir: Path, store: str | None) -> None:
    # Reading commands must not create an empty store in a mistyped folder or database.
    if _store_exists(workdir, store):
        return
    if store is None:
        raise RunNotFound(f"no runs in {workdir.absolute()} (no batchkling.db there): runs "
                          "started from another folder are in its jobs/; use --workdir DIR, "
                          "BATCHKLING_HOME or --store")
    from batchkling.store import store_from

    raise RunNotFound(f"no runs yet in {store_from(store).location}: check --store")


def _check_location(location: str) -> None:
    """Refuse a store location that names no backend before anything else happens."""
    from batchkling.store import store_from

    store_from(location)


def _run_async(fn: Callable[[], Awaitable[_T]]) -> _T:
    # aiosqlite is asyncio-only, so the backend is fixed.
    with unwrapped_groups():
        return anyio.run(fn, backend="asyncio")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchkling")
def cli() -> None:
    """batchkling — run YAML manifests of Kling video jobs to finished, downloaded videos.

    Exit codes: 0 all jobs succeeded · 1 some jobs failed · 2 bad input, nothing submitted ·
    3 stopped with jobs left to do · 4 the provider refused the account · 5 this process was
    presumed dead and another took its jobs over · 130 interrupted. The run's last lines
    ("next: …") name the command that continues it.

    Shell completion: eval "$(_BATCHKLING_COMPLETE=bash_source batchkling)" (zsh_source,
    fish_source for those shells).
    """


# ---- run, resume, retry ------------------------------------------------------------------


def _configure_console() -> None:
    from batchkling.logs import configure_logging

    # A person gets the live display and only warnings as text; cron gets every event as JSON.
    interactive = sys.stderr.isatty()
    configure_logging(console="pretty" if interactive else "json",
                      level="warning" if interactive else "info")
    # psycopg-pool's own warnings (a connection dropped, a reconnect refused) would reach
    # stderr as bare text; the store's error says the same once, in batchkling's words.
    import logging

    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


def _simulated_env(config: Any) -> dict[str, str]:
    from batchkling.simulator import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY

    env = dict(os.environ)
    provider = config.provider
    if provider.api_key_env:
        env[provider.api_key_env] = SIMULATE_KEY
    if provider.access_key_env:
        env[provider.access_key_env] = DEFAULT_ACCESS_KEY
    if provider.secret_key_env:
        env[provider.secret_key_env] = DEFAULT_SECRET_KEY
    return env


#: Where ``--simulate`` keeps the simulated account's tasks, so a resume finds them again.
SIMULATOR_JOURNAL = "simulator-tasks.jsonl"


def _declared_models(config: Any) -> tuple[str, ...]:
    """The manifest's declared models as the simulator takes them: ``id=STD/PRO``."""
    entries = []
    for model, declared in (config.models or {}).items():
        price = declared.prices(model, "usd")
        entries.append(f"{model}={price[f'{model}:std']:g}/{price[f'{model}:pro']:g}")
    return tuple(entries)


@contextmanager
def _simulator(enabled: bool, speed: float, workdir: Path,
               models: tuple[str, ...] = ()) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    from batchkling.simulator import SimConfig, SimulatorServer

    journal: Path | None = workdir / SIMULATOR_JOURNAL
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError:
        journal = None  # the store reports the unusable workdir in its own words
    # The manifest's declared models are the simulated provider's too, at their prices.
    config = SimConfig(speed=speed, seed=0, extra_models=models)
    with SimulatorServer(config, journal=journal) as sim:
        click.echo(f"batchkling: simulator running on {sim.base_url} (speed x{speed:g}); "
                   "no account needed, nothing is billed", err=True)
        if sim.sim.restored:
            click.echo(f"batchkling: the simulated account still has its {sim.sim.restored} "
                       f"earlier tasks ({journal})", err=True)
        yield sim.base_url


async def _drive(make: Callable[[], Any], action: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``action(orchestrator)`` with Ctrl-C/SIGTERM handling around it."""
    console: Any = None
    if sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True, highlight=False)

    def say(message: str) -> None:
        # Through the display's console, so the line lands above the frame, not inside it.
        if console is not None:
            console.print(message, markup=False, soft_wrap=True)
        else:
            click.echo(message, err=True)

    async with make() as orch, anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                count = 0
                async for _signum in signals:
                    count += 1
                    if count == 1:
                        say("batchkling: stopping: no new tasks; the tasks already created keep "
                            "rendering and are checkpointed (press Ctrl-C again to exit at once)")
                        orch.interrupt()
                    else:
                        # The DB is consistent at every commit; remote tasks are resumable.
                        os._exit(EXIT_INTERRUPTED)

        tg.start_soon(watch_signals)
        if console is not None:
            from batchkling.progress import show_progress

            tg.start_soon(show_progress, orch, console)
        summary = await action(orch)
        tg.cancel_scope.cancel()
    return summary


def _finish(summary: Any, workdir: Path, manifest: str | None = None,
            simulated: bool = False) -> NoReturn:
    """The end-of-run lines: jobs in the store's words, cost, files, and what to do next."""
    if summary.exit_code == EXIT_FENCED:
        click.echo(f"batchkling: run {summary.run_id}: stopped: {summary.stop_reason}. "
                   f"`batchkling status {summary.run_id}` shows who drives it now.", err=True)
        sys.exit(EXIT_FENCED)
    from batchkling.outputs.nextstep import next_steps, outcome_of
    from batchkling.outputs.views import describe_states, money_text

    states = summary.states or summary.counts
    click.echo(f"batchkling: run {summary.run_id}: {describe_states(states) or 'no jobs'}; "
               f"cost {money_text(summary.cost_usd, summary.committed_usd, summary.cost_units)}",
               err=True)
    for line in _money_lines(summary):
        click.echo(f"batchkling: {line}", err=True)
    # Said once, here: the display's last frame leaves it to this line.
    if summary.stop_reason:
        from batchkling.logs import redactor

        click.echo(f"batchkling: creates stopped: {redactor.scrub_text(summary.stop_reason)}",
                   err=True)
    files = [f for f in (summary.results_csv, summary.report_html) if f]
    if files:
        click.echo(f"batchkling: results: {' · '.join(files)}", err=True)
    outcome = outcome_of(summary.run_id, exit_code=summary.exit_code,
                         stop_kind=summary.stop_kind, states=states, manifest=manifest,
                         simulated=simulated, live=False, workdir=workdir,
                         stop_reason=summary.stop_reason)
    for step in next_steps(outcome):
        click.echo(f"batchkling: next: {step}", err=True)
    sys.exit(summary.exit_code)


def _money_lines(summary: Any) -> list[str]:
    """Spent, committed and the cap, then what the run found out about prices."""
    lines = []
    if summary.max_usd is not None:
        lines.append(f"money: spent ${summary.cost_usd:.2f}, committed "
                     f"${summary.committed_usd:.2f} of budget.max_usd ${summary.max_usd:.2f}")
    if summary.max_units is not None:
        lines.append(f"units: spent {summary.cost_units:g}, committed "
                     f"{summary.committed_units:g} of budget.max_units {summary.max_units:g}")
    if summary.reused:
        lines.append(f"reused {summary.reused} video{'s' if summary.reused != 1 else ''} of "
                     "earlier runs (no render, cost $0)")
    return lines + [f"note: {note}" for note in summary.notes]


def _speed(speed: float | None, simulated: bool) -> float:
    return speed if speed is not None else (SIMULATE_SPEED if simulated else 1.0)



@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run-id", help="Run id (default: the manifest's name); '{date}' expands to today.")
@WORKDIR
@STORE
@click.option("--simulate", is_flag=True,
              help="Run against the built-in simulator: no account, nothing billed.")
@SPEED
@click.option("--max-in-flight", type=click.IntRange(min=1, max=1000),
              help="Override limits.max_in_flight.")
@click.option("--yes", is_flag=True,
              help="Do not ask for confirmation on a terminal; start a run afresh even over "
              "videos its (lost) database recorded, paying for them again.")
@STALE_AFTER
@OUTPUT_STORE
@CALLBACK_LISTEN
def run(manifest: Path, run_id: str | None, workdir: Path, store: str | None, simulate: bool,
        speed: float | None, max_in_flight: int | None, yes: bool, stale_after: float,
        output_store: str | None, callback_listen: str | None) -> None:
    """Run MANIFEST: submit, poll, download. Re-running an unfinished run resumes it."""
    from batchkling.manifest.document import load_manifest
    from batchkling.run.orchestrator import Orchestrator

    with _errors_to_exit_codes():
        location = _location(workdir, store)
        _check_location(location)  # a --store that names no store fails before anything runs
        loaded = load_manifest(manifest, spool=True)  # its jobs on disk, not in memory
        for warning in loaded.warnings:
            click.echo(f"warning: {warning}", err=True)
        if not yes and not simulate and sys.stdin.isatty() and sys.stderr.isatty():
            from batchkling.pricing import estimate_usd

            overrides = loaded.price_overrides()
            total = sum(estimate_usd(s, overrides) for s in loaded.expand())
            click.confirm(f"{loaded.job_count} jobs, about ${total:.2f} if all are new "
                          "(finished jobs are never paid twice). Start?", abort=True, err=True)
        _configure_console()
        scale = _speed(speed, simulate)
        with _simulator(simulate, scale, workdir, _declared_models(loaded)) as sim_url:
            env = _simulated_env(loaded) if simulate else None
            summary = _run_async(lambda: _drive(
                lambda: Orchestrator(loaded, run_id=run_id, workdir=workdir, store=location,
                                     env=env, base_url=sim_url, simulated=simulate,
                                     max_in_flight=max_in_flight, time_scale=scale,
                                     stale_after=stale_after, output_store=output_store,
                                     overwrite_videos=yes, callback_listen=callback_listen),
                lambda orch: orch.run()))
    _finish(summary, workdir, str(loaded.source_path), simulate)


def _resume_like(run_id: str, workdir: Path, store: str | None, speed: float | None,
                 action: Callable[[Any], Awaitable[Any]], stale_after: float,
                 callback_listen: str | None = None) -> NoReturn:
    from batchkling.run.orchestrator import Orchestrator
    from batchkling.store import store_from

    location = _location(workdir, store)

    async def lookup() -> Any:
        async with store_from(location) as db:
            return await db.require_run(run_id)

    with _errors_to_exit_codes():
        _require_db(workdir, store)
        stored = _run_async(lookup)
        _configure_console()
        simulated = stored.simulated
        env: dict[str, str] | None = None
        models: tuple[str, ...] = ()
        if simulated:
            from batchkling.run.orchestrator import _config_from

            config = _config_from(stored)
            env, models = _simulated_env(config), _declared_models(config)
        scale = _speed(speed, simulated)
        with _simulator(simulated, scale, workdir, models) as sim_url:
            summary = _run_async(lambda: _drive(
                lambda: Orchestrator(run_id=run_id, workdir=workdir, store=location, env=env,
                                     base_url=sim_url, simulated=simulated, time_scale=scale,
                                     stale_after=stale_after, callback_listen=callback_listen),
                action))
    _finish(summary, workdir, stored.manifest_path, simulated)


@cli.command()
@click.argument("run_id")
@WORKDIR
@STORE
@RESUME_SPEED
@STALE_AFTER
@CALLBACK_LISTEN
def resume(run_id: str, workdir: Path, store: str | None, speed: float | None,
           stale_after: float, callback_listen: str | None) -> None:
    """Continue RUN_ID from its checkpoint; the manifest file is not needed."""
    _resume_like(run_id, workdir, store, speed, lambda orch: orch.resume(), stale_after,
                 callback_listen)


@cli.command()
@click.argument("run_id")
@WORKDIR
@STORE
@click.option("--failed", is_flag=True, help="Resubmit failed jobs (the default).")
@click.option("--unknown", is_flag=True,
              help="Resubmit jobs whose create had no clear answer (same idempotency key).")
@click.option("--timed-out", is_flag=True, help="Give up waiting on timed-out tasks; new tasks.")
@click.option("--job", "job_ids", multiple=True, metavar="ID", help="Only these jobs (repeat).")
@click.option("--force", is_flag=True,
              help="Render a --job that already succeeded again (and pay again) without asking.")
@RESUME_SPEED
@STALE_AFTER
@CALLBACK_LISTEN
def retry(run_id: str, workdir: Path, store: str | None, failed: bool, unknown: bool,
          timed_out: bool, job_ids: tuple[str, ...], force: bool, speed: float | None,
          stale_after: float, callback_listen: str | None) -> None:
    """Resubmit finished-but-unsuccessful jobs of RUN_ID, then continue the run.

    A --job that already succeeded is a decision, not an accident: a terminal asks first;
    elsewhere --force is needed.
    """
    from batchkling.run.engine import select_states

    states = select_states({"failed": failed, "unknown": unknown, "timed_out": timed_out})
    if job_ids and not force and sys.stdin.isatty() and sys.stderr.isatty():
        force = _confirm_rerender(run_id, workdir, store, job_ids)
    _resume_like(run_id, workdir, store, speed,
                 lambda orch: orch.retry(states, job_ids, force=force), stale_after,
                 callback_listen)


def _confirm_rerender(run_id: str, workdir: Path, store: str | None,
                      job_ids: tuple[str, ...]) -> bool:
    """Ask before a retry renders succeeded jobs again; True once the person agreed."""
    from batchkling.run.orchestrator import describe_done, succeeded_jobs
    from batchkling.store import store_from

    location = _location(workdir, store)

    async def lookup() -> list[str]:
        async with store_from(location) as db:
            return await succeeded_jobs(db, run_id, job_ids)

    with _errors_to_exit_codes():
        _require_db(workdir, store)
        done = _run_async(lookup)
    if done:
        click.confirm(f"{describe_done(done)} already succeeded: render again and pay again?",
                      abort=True, err=True)
    return bool(done)


# ---- many machines: submit and worker -----------------------------------------------------


def _store_at(store: str | None, workdir: Path) -> Any:
    from batchkling.store import store_from

    return store_from(_location(workdir, store))


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run-id", help="Run id (default: the manifest's name); '{date}' expands to today.")
@WORKDIR
@STORE
def submit(manifest: Path, run_id: str | None, workdir: Path, store: str | None) -> None:
    """Record MANIFEST's run and jobs for `batchkling worker`s to drive; creates nothing."""
    from batchkling.manifest.document import load_manifest
    from batchkling.run.orchestrator import Orchestrator

    with _errors_to_exit_codes():
        loaded = load_manifest(manifest, spool=True)
        for warning in loaded.warnings:
            click.echo(f"warning: {warning}", err=True)

        async def go() -> tuple[str, dict[str, int]]:
            async with Orchestrator(loaded, run_id=run_id, workdir=workdir,
                                    store=_store_at(store, workdir)) as orch, orch.store:
                return orch.run_id, await orch.submit()

        recorded, counts = _run_async(go)
    described = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()) if n)
    click.echo(f"batchkling: run {recorded} submitted: {described or 'no jobs'}. Start workers "
               f"with `batchkling worker` (same store); `batchkling status {recorded}` "
               "follows it.", err=True)


@cli.command()
@WORKDIR
@STORE
@click.option("--run", "runs", multiple=True, metavar="RUN_ID",
              help="Serve only this run (repeat); default: every open run in the store.")
@STALE_AFTER
@click.option("--exit-when-idle", is_flag=True,
              help="Stop once no open run has work, instead of waiting for new runs.")
@click.option("--max-in-flight", type=click.IntRange(min=1, max=1000),
              help="Cap every account's slots for this worker's creates.")
@SPEED
@CALLBACK_LISTEN
def worker(workdir: Path, store: str | None, runs: tuple[str, ...], stale_after: float,
           exit_when_idle: bool, max_in_flight: int | None, speed: float | None,
           callback_listen: str | None) -> None:
    """Drive the jobs of every open run in the store, beside any number of other workers.

    Workers share provider accounts' slots and each run's budget through the store; a worker
    silent past --stale-after is presumed dead and the others take its jobs over. Every
    worker that serves an account needs that account's key in its environment.
    """
    from batchkling.run.worker import Worker, describe

    with _errors_to_exit_codes():
        _configure_console()

        async def go() -> Any:
            async with _store_at(store, workdir) as shared, anyio.create_task_group() as tg:
                serving = Worker(store=shared, workdir=workdir, runs=runs or None,
                                 stale_after=stale_after, exit_when_idle=exit_when_idle,
                                 max_in_flight=max_in_flight, time_scale=speed or 1.0,
                                 callback_listen=callback_listen)

                async def watch_signals() -> None:
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        count = 0
                        async for _signum in signals:
                            count += 1
                            if count > 1:
                                os._exit(EXIT_INTERRUPTED)
                            click.echo("\nbatchkling: worker stopping: no new tasks; other "
                                       "workers (or `resume`) take over what is in flight",
                                       err=True)
                            serving.interrupt()

                tg.start_soon(watch_signals)
                summary = await serving.serve()
                tg.cancel_scope.cancel()
                return summary

        summary = _run_async(go)
    for line in describe(summary):
        click.echo(f"batchkling: worker {summary.worker_id}: {line}", err=True)
    sys.exit(summary.exit_code)


# ---- views -------------------------------------------------------------------------------


@cli.command()
@click.argument("run_id", required=False)
@WORKDIR
@STORE
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(run_id: str | None, workdir: Path, store: str | None, as_json: bool) -> None:
    """Counts by state and cost for RUN_ID; without it, every run in the store."""
    from batchkling.outputs.views import run_status, runs_table

    with _errors_to_exit_codes():
        location = _location(workdir, store)
        if run_id:
            _require_db(workdir, store)
        if not _store_exists(workdir, store):
            data: Any = []
        else:
            data = _run_async(lambda: run_status(workdir, run_id, store=location) if run_id
                              else runs_table(workdir, location))
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    from batchkling.outputs.views import live_workers, print_status, print_workers
    from batchkling.store import store_from

    print_status(data, single=run_id is not None, store=store_from(location).location
                 if store else str((workdir / "batchkling.db").absolute()))
    if not run_id and data:
        print_workers(_run_async(lambda: live_workers(workdir, location)))


@cli.command()
@click.argument("run_id")
@WORKDIR
@STORE
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the CSV (default: the run's results.csv).")
def export(run_id: str, workdir: Path, store: str | None, output: Path | None) -> None:
    """Write RUN_ID's results CSV."""
    from batchkling.outputs.views import export_csv

    with _errors_to_exit_codes():
        location = _location(workdir, store)
        _require_db(workdir, store)
        path = _run_async(lambda: export_csv(workdir, run_id, output, location))
    click.echo(str(path))


@cli.command()
@click.argument("run_id")
@WORKDIR
@STORE
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the page (default: the run's report.html).")
def report(run_id: str, workdir: Path, store: str | None, output: Path | None) -> None:
    """Write RUN_ID's contact sheet: one card per job with its video, grouped by matrix axes."""
    from batchkling.outputs.report import write_report
    from batchkling.store import store_from

    location = _location(workdir, store)

    async def go() -> Path:
        async with store_from(location) as db:
            return await write_report(db, run_id, output or workdir / run_id / "report.html",
                                      workdir=workdir)

    with _errors_to_exit_codes():
        _require_db(workdir, store)
        path = _run_async(go)
    click.echo(str(path))


@cli.command()
@click.argument("run_id")
@click.argument("job_id")
@WORKDIR
@STORE
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(run_id: str, job_id: str, workdir: Path, store: str | None, as_json: bool) -> None:
    """Everything about one job: its request, every attempt, its events and its file."""
    from batchkling.outputs.views import job_detail

    with _errors_to_exit_codes():
        location = _location(workdir, store)
        _require_db(workdir, store)
        data = _run_async(lambda: job_detail(workdir, run_id, job_id, location))
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))
        return
    from batchkling.outputs.views import print_job

    print_job(data)


@cli.command()
@click.argument("run_id")
@WORKDIR
@STORE
@click.option("--files", is_flag=True,
              help="Also delete the run's folder (videos, results.csv, report.html, run.log).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation on a terminal.")
def forget(run_id: str, workdir: Path, store: str | None, files: bool, yes: bool) -> None:
    """Remove RUN_ID's records from the store (refused while it runs); --files: its folder too.

    Tasks the provider still renders for it are not cancelled; a later run of the same id
    starts afresh and pays again for every job.
    """
    from batchkling.run.forget import forget_run

    with _errors_to_exit_codes():
        location = _location(workdir, store)
        _require_db(workdir, store)
        if not yes and sys.stdin.isatty() and sys.stderr.isatty():
            what = "its records and its folder" if files else "its records"
            click.confirm(f"Forget run {run_id} ({what})? A later run of this id pays again "
                          "for every job.", abort=True, err=True)
        jobs, folder = _run_async(lambda: forget_run(workdir, run_id, files=files,
                                                     store=location))
    click.echo(f"batchkling: forgot run {run_id} ({jobs:,} job{'s' if jobs != 1 else ''})"
               + (f"; deleted {folder}" if folder else ""), err=True)


# ---- plan, schema, simulate --------------------------------------------------------------


def _plan_history(workdir: Path, store: str | None) -> Callable[[Any], Any]:
    """What ``plan`` learns from the store, if there is one: observed prices, and the
    fingerprints earlier runs already rendered (8 bytes each, so a large store fits). Read only;
    a store that cannot be read is skipped, and said."""

    def read(manifest: Any) -> Any:
        from batchkling.pricing import Fingerprints, History
        from batchkling.store import store_from

        location = _location(workdir, store)

        async def go() -> History:
            async with store_from(location) as db:
                rendered, after = Fingerprints(), ""
                while page := await db.downloaded_fingerprints(after=after):
                    rendered.extend_sorted(page)
                    after = page[-1]
                return History(await db.observed_prices(), rendered)

        try:
            if not _store_exists(workdir, store):
                return None
            return _run_async(go)
        except BatchklingError as exc:
            click.echo(f"warning: the store's observed prices could not be read ({exc}); "
                       "showing table estimates", err=True)
            return None

    return read


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--max-in-flight", type=click.IntRange(min=1), help="Override limits.max_in_flight.")
@click.option("--run-id", help="Compare with this run (default: the manifest's name, if such a "
              "run exists): what is new, changed, unchanged or reused, and what it would cost.")
@WORKDIR
@STORE
def plan(manifest: Path, as_json: bool, max_in_flight: int | None, run_id: str | None,
         workdir: Path, store: str | None) -> None:
    """Validate and expand MANIFEST; show jobs, cost and time estimates. Submits nothing.

    Against an existing run, only what `run` would submit is priced. Prices the store has
    observed the provider charge replace the table's estimates, marked so.
    """
    from batchkling.manifest.plan import print_plan

    def against(name: str) -> tuple[dict[str, tuple[str, str]], str, float] | None:
        return _plan_against(workdir, store, run_id, name)

    with _errors_to_exit_codes():
        try:
            print_plan(manifest, as_json=as_json, max_in_flight=max_in_flight, against=against,
                       history=_plan_history(workdir, store))
        except BatchklingError as exc:
            if isinstance(exc, ManifestError):
                raise
            _fail(str(exc), EXIT_BAD_INPUT)


def _plan_against(workdir: Path, store: str | None, run_id: str | None, name: str
                  ) -> tuple[dict[str, tuple[str, str]], str, float] | None:
    """The stored run a plan compares with: ``--run-id``, else the manifest's name."""
    from batchkling.run.orchestrator import resolve_run_id
    from batchkling.store import store_from

    wanted = resolve_run_id(run_id or name)
    location = _location(workdir, store)
    if not _store_exists(workdir, store):
        if run_id:
            click.echo(f"batchkling: no run {wanted!r} in {workdir.absolute()}: every job is new",
                       err=True)
        return None

    async def read() -> tuple[dict[str, tuple[str, str]], str, float] | None:
        async with store_from(location) as db:
            if await db.get_run(wanted) is None:
                return None
            index = await db.job_index(wanted)
            _spent, committed = await db.money(wanted)
        return {job: (fp, state.value) for job, (fp, state) in index.items()}, wanted, committed

    found = _run_async(read)
    if found is None and run_id:
        click.echo(f"batchkling: no run {wanted!r} in {workdir.absolute()}: every job is new",
                   err=True)
    return found


@cli.command()
def schema() -> None:
    """Print the manifest's JSON Schema (for editor completion)."""
    from batchkling.manifest.document import manifest_json_schema

    click.echo(json.dumps(manifest_json_schema(), indent=2))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--speed", default=1.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Render-time divisor: 60 makes a one-minute render take one second.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--faults", default="none", show_default=True, metavar="PROFILE|FILE",
              help="A named fault profile — " + "; ".join(
                  f"{name}: {what}" for name, what in FAULT_PROFILES.items())
              + " — or a YAML/JSON file of simulator settings (`profile: flaky` plus fields).")
@click.option("--api-key", default=None, help="Require this bearer key on the ImaRouter shape.")
@click.option("--access-key", default=None, help="Kling-shape JWT access key.")
@click.option("--secret-key", default=None, help="Kling-shape JWT secret key.")
@click.option("--journal", type=click.Path(dir_okay=False, path_type=Path),
              help="Keep tasks in this file: a simulator started again with it still has them.")
@click.option("--models", default="", metavar="ID[=STD/PRO],...",
              help="Accept these model ids besides the built-in ones (e.g. kling-v2-7, or "
              "kling-v2-7=0.07/0.112 to bill that many USD per second of std/pro video).")
@click.option("--price-factor", type=click.FloatRange(min=0), default=None,
              help="Bill this many times the price table (default 1; 1.6 bills 60% above it).")
def simulate(host: str, port: int, speed: float, seed: int, faults: str, api_key: str | None,
             access_key: str | None, secret_key: str | None, journal: Path | None,
             models: str, price_factor: float | None) -> None:
    """Serve a local ImaRouter- and Kling-compatible API with faults on demand."""
    from batchkling.simulator import serve_forever

    with _errors_to_exit_codes():
        try:
            serve_forever(host=host, port=port, speed=speed, seed=seed, faults=faults,
                          api_key=api_key, access_key=access_key, secret_key=secret_key,
                          journal=journal, price_factor=price_factor,
                          models=tuple(m.strip() for m in models.split(",") if m.strip()))
        except BatchklingError as exc:
            _fail(str(exc), EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="batchkling")
    except KeyboardInterrupt:  # Ctrl-C outside a run (a prompt, a plan)
        click.echo("batchkling: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
