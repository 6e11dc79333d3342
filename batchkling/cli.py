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
    unwrapped_groups,
)

EXIT_OK = 0
EXIT_FAILED_JOBS = 1
EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 3
EXIT_ACCOUNT = 4
EXIT_INTERRUPTED = 130

#: ``--simulate`` compresses time by this factor: a 90 s render takes 1.5 s.
SIMULATE_SPEED = 60.0
#: The key ``--simulate`` puts in the environment for the run: the simulator accepts any key.
SIMULATE_KEY = "sk-simulated-throwaway-key"

_T = TypeVar("_T")
WORKDIR = click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), envvar="BATCHKLING_HOME",
    default=Path("jobs"), show_default=True, show_envvar=True,
    help="Where the state DB and run folders live.",
)

SPEED = click.option(
    "--speed", type=click.FloatRange(min=1), default=None,
    help="How much faster than real renders are: with --simulate (default 60), or for a "
    "simulator started with `batchkling simulate --speed X`. Polls and deadlines shrink with it.",
)

#: Shared by every command that runs jobs (``run``; workers too).
OUTPUT_STORE = click.option(
    "--output-store", metavar="s3://BUCKET/PREFIX/", default=None,
    help="Put each verified video in this S3-compatible bucket (overrides output.store; "
    "credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE).",
)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"batchkling: error: {message}", err=True)
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
    except StoreError as exc:
        _fail(str(exc), EXIT_INCOMPLETE)
    except BatchklingError as exc:
        _fail(str(exc), EXIT_FAILED_JOBS)
    except Exception as exc:
        if os.environ.get("BATCHKLING_DEBUG"):
            raise
        from batchkling.logs import redactor

        _fail(f"internal error: {redactor.scrub(f'{type(exc).__name__}: {exc}')} — this is a "
              "bug; set BATCHKLING_DEBUG=1 to see the traceback and please report it. The "
              "state database is consistent: `resume` continues the run.", EXIT_FAILED_JOBS)


def _require_db(workdir: Path) -> None:
    # Reading commands must not create an empty database in a mistyped folder.
    if not (workdir / "batchkling.db").exists():
        raise RunNotFound(f"no runs in {workdir} (no batchkling.db): check --workdir")


def _run_async(fn: Callable[[], Awaitable[_T]]) -> _T:
    # aiosqlite is asyncio-only, so the backend is fixed.
    with unwrapped_groups():
        return anyio.run(fn, backend="asyncio")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchkling")
def cli() -> None:
    """batchkling — run YAML manifests of Kling video jobs to finished, downloaded videos.

    Exit codes: 0 all jobs succeeded · 1 some jobs failed · 2 bad input, nothing submitted ·
    3 stopped with jobs left to do (resume later) · 4 the provider refused the account ·
    130 interrupted.
    """


# ---- run, resume, retry ------------------------------------------------------------------


def _configure_console() -> None:
    from batchkling.logs import configure_logging

    # A person gets the live display and only warnings as text; cron gets every event as JSON.
    interactive = sys.stderr.isatty()
    configure_logging(console="pretty" if interactive else "json",
                      level="warning" if interactive else "info")


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


@contextmanager
def _simulator(enabled: bool, speed: float, workdir: Path) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    from batchkling.simulator import SimConfig, SimulatorServer

    journal: Path | None = workdir / SIMULATOR_JOURNAL
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError:
        journal = None  # the store reports the unusable workdir in its own words
    with SimulatorServer(SimConfig(speed=speed, seed=0), journal=journal) as sim:
        click.echo(f"batchkling: simulator running on {sim.base_url} (speed x{speed:g}); "
                   "no account needed, nothing is billed", err=True)
        if sim.sim.restored:
            click.echo(f"batchkling: the simulated account still has its {sim.sim.restored} "
                       f"earlier tasks ({journal})", err=True)
        yield sim.base_url


async def _drive(make: Callable[[], Any], action: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``action(orchestrator)`` with Ctrl-C/SIGTERM handling around it."""
    async with make() as orch, anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                count = 0
                async for _signum in signals:
                    count += 1
                    if count == 1:
                        click.echo("\nbatchkling: stopping: no new tasks; checkpointing "
                                   "(press Ctrl-C again to exit at once)", err=True)
                        orch.interrupt()
                    else:
                        # The DB is consistent at every commit; remote tasks are resumable.
                        os._exit(EXIT_INTERRUPTED)

        tg.start_soon(watch_signals)
        if sys.stderr.isatty():
            from rich.console import Console

            from batchkling.progress import show_progress

            tg.start_soon(show_progress, orch, Console(stderr=True))
        summary = await action(orch)
        tg.cancel_scope.cancel()
    return summary


def _finish(summary: Any) -> NoReturn:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items()) if n)
    click.echo(f"batchkling: run {summary.run_id}: {counts or 'no jobs'}; "
               f"cost {summary.cost_text()}", err=True)
    if summary.stop_reason:
        click.echo(f"batchkling: creates stopped: {summary.stop_reason}", err=True)
    if summary.results_csv:
        click.echo(f"batchkling: results: {summary.results_csv}", err=True)
    if summary.exit_code == EXIT_INCOMPLETE:
        click.echo(f"batchkling: jobs are left to do: `batchkling resume {summary.run_id}`",
                   err=True)
    sys.exit(summary.exit_code)


def _speed(speed: float | None, simulated: bool) -> float:
    return speed if speed is not None else (SIMULATE_SPEED if simulated else 1.0)



@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run-id", help="Run id (default: the manifest's name); '{date}' expands to today.")
@WORKDIR
@click.option("--simulate", is_flag=True,
              help="Run against the built-in simulator: no account, nothing billed.")
@SPEED
@click.option("--max-in-flight", type=click.IntRange(min=1, max=1000),
              help="Override limits.max_in_flight.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation on a terminal.")
@OUTPUT_STORE
def run(manifest: Path, run_id: str | None, workdir: Path, simulate: bool, speed: float | None,
        max_in_flight: int | None, yes: bool, output_store: str | None) -> None:
    """Run MANIFEST: submit, poll, download. Re-running an unfinished run resumes it."""
    from batchkling.manifest.document import load_manifest
    from batchkling.run.orchestrator import Orchestrator

    with _errors_to_exit_codes():
        loaded = load_manifest(manifest)
        for warning in loaded.warnings:
            click.echo(f"warning: {warning}", err=True)
        if not yes and not simulate and sys.stdin.isatty() and sys.stderr.isatty():
            from batchkling.pricing import estimate_usd

            total = sum(estimate_usd(s, loaded.pricing) for s in loaded.expand())
            click.confirm(f"{len(loaded.expand())} jobs, about ${total:.2f} if all are new "
                          "(finished jobs are never paid twice). Start?", abort=True, err=True)
        _configure_console()
        scale = _speed(speed, simulate)
        with _simulator(simulate, scale, workdir) as sim_url:
            env = _simulated_env(loaded) if simulate else None
            summary = _run_async(lambda: _drive(
                lambda: Orchestrator(loaded, run_id=run_id, workdir=workdir, env=env,
                                     base_url=sim_url, simulated=simulate,
                                     max_in_flight=max_in_flight, time_scale=scale,
                                     output_store=output_store),
                lambda orch: orch.run()))
    _finish(summary)


def _resume_like(run_id: str, workdir: Path, speed: float | None,
                 action: Callable[[Any], Awaitable[Any]]) -> NoReturn:
    from batchkling.run.orchestrator import Orchestrator
    from batchkling.store.sqlite import SqliteStore

    async def lookup() -> Any:
        async with SqliteStore(workdir / "batchkling.db") as store:
            return await store.require_run(run_id)

    with _errors_to_exit_codes():
        _require_db(workdir)
        stored = _run_async(lookup)
        _configure_console()
        simulated = stored.simulated
        env: dict[str, str] | None = None
        if simulated:
            from batchkling.run.orchestrator import _config_from

            env = _simulated_env(_config_from(stored))
        scale = _speed(speed, simulated)
        with _simulator(simulated, scale, workdir) as sim_url:
            summary = _run_async(lambda: _drive(
                lambda: Orchestrator(run_id=run_id, workdir=workdir, env=env,
                                     base_url=sim_url, simulated=simulated, time_scale=scale),
                action))
    _finish(summary)


@cli.command()
@click.argument("run_id")
@WORKDIR
@SPEED
def resume(run_id: str, workdir: Path, speed: float | None) -> None:
    """Continue RUN_ID from its checkpoint; the manifest file is not needed."""
    _resume_like(run_id, workdir, speed, lambda orch: orch.resume())


@cli.command()
@click.argument("run_id")
@WORKDIR
@click.option("--failed", is_flag=True, help="Resubmit failed jobs (the default).")
@click.option("--unknown", is_flag=True,
              help="Resubmit jobs whose create had no clear answer (same idempotency key).")
@click.option("--timed-out", is_flag=True, help="Give up waiting on timed-out tasks; new tasks.")
@click.option("--job", "job_ids", multiple=True, metavar="ID", help="Only these jobs (repeat).")
@SPEED
def retry(run_id: str, workdir: Path, failed: bool, unknown: bool, timed_out: bool,
          job_ids: tuple[str, ...], speed: float | None) -> None:
    """Resubmit finished-but-unsuccessful jobs of RUN_ID, then continue the run."""
    from batchkling.run.engine import select_states

    states = select_states({"failed": failed, "unknown": unknown, "timed_out": timed_out})
    _resume_like(run_id, workdir, speed, lambda orch: orch.retry(states, job_ids))


# ---- views -------------------------------------------------------------------------------


@cli.command()
@click.argument("run_id", required=False)
@WORKDIR
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(run_id: str | None, workdir: Path, as_json: bool) -> None:
    """Counts by state and cost for RUN_ID; without it, every run in the workdir."""
    from batchkling.outputs.views import run_status, runs_table

    with _errors_to_exit_codes():
        if run_id:
            _require_db(workdir)
        if not (workdir / "batchkling.db").exists():
            data: Any = []
        else:
            data = _run_async(lambda: run_status(workdir, run_id) if run_id
                              else runs_table(workdir))
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    from batchkling.outputs.views import print_status

    print_status(data, single=run_id is not None)


@cli.command()
@click.argument("run_id")
@WORKDIR
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the CSV (default: the run's results.csv).")
def export(run_id: str, workdir: Path, output: Path | None) -> None:
    """Write RUN_ID's results CSV."""
    from batchkling.outputs.views import export_csv

    with _errors_to_exit_codes():
        _require_db(workdir)
        path = _run_async(lambda: export_csv(workdir, run_id, output))
    click.echo(str(path))


@cli.command()
@click.argument("run_id")
@WORKDIR
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the page (default: the run's report.html).")
def report(run_id: str, workdir: Path, output: Path | None) -> None:
    """Write RUN_ID's contact sheet: one card per job with its video, grouped by matrix axes."""
    from batchkling.outputs.report import write_report
    from batchkling.store.sqlite import SqliteStore

    async def go() -> Path:
        async with SqliteStore(workdir / "batchkling.db") as store:
            return await write_report(store, run_id, output or workdir / run_id / "report.html")

    with _errors_to_exit_codes():
        _require_db(workdir)
        path = _run_async(go)
    click.echo(str(path))


# ---- plan, schema, simulate --------------------------------------------------------------


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--max-in-flight", type=click.IntRange(min=1), help="Override limits.max_in_flight.")
def plan(manifest: Path, as_json: bool, max_in_flight: int | None) -> None:
    """Validate and expand MANIFEST; show jobs, cost and time estimates. Submits nothing."""
    from batchkling.manifest.plan import print_plan

    with _errors_to_exit_codes():
        try:
            print_plan(manifest, as_json=as_json, max_in_flight=max_in_flight)
        except BatchklingError as exc:
            if isinstance(exc, ManifestError):
                raise
            _fail(str(exc), EXIT_BAD_INPUT)


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
@click.option("--faults", default="none", show_default=True,
              help="A named fault profile, or a YAML/JSON file of simulator settings.")
@click.option("--api-key", default=None, help="Require this bearer key on the ImaRouter shape.")
@click.option("--access-key", default=None, help="Kling-shape JWT access key.")
@click.option("--secret-key", default=None, help="Kling-shape JWT secret key.")
@click.option("--journal", type=click.Path(dir_okay=False, path_type=Path),
              help="Keep tasks in this file: a simulator started again with it still has them.")
def simulate(host: str, port: int, speed: float, seed: int, faults: str, api_key: str | None,
             access_key: str | None, secret_key: str | None, journal: Path | None) -> None:
    """Serve a local ImaRouter- and Kling-compatible API with faults on demand."""
    from batchkling.simulator import serve_forever

    with _errors_to_exit_codes():
        try:
            serve_forever(host=host, port=port, speed=speed, seed=seed, faults=faults,
                          api_key=api_key, access_key=access_key, secret_key=secret_key,
                          journal=journal)
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
