"""The command line. The only module that prints, configures logging and chooses exit codes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from batchkling.errors import BatchklingError, ManifestError

EXIT_OK = 0
EXIT_FAILED_JOBS = 1
EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 3
EXIT_ACCOUNT = 4
EXIT_INTERRUPTED = 130


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchkling")
def cli() -> None:
    """batchkling — run YAML manifests of Kling video jobs to finished, downloaded videos."""


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--max-in-flight", type=click.IntRange(min=1), help="Override limits.max_in_flight.")
def plan(manifest: Path, as_json: bool, max_in_flight: int | None) -> None:
    """Validate and expand MANIFEST; show jobs, cost and time estimates. Submits nothing."""
    from batchkling.plan import print_plan

    try:
        print_plan(manifest, as_json=as_json, max_in_flight=max_in_flight)
    except ManifestError as exc:
        _report_manifest_error(exc)
    except BatchklingError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)


@cli.command()
def schema() -> None:
    """Print the manifest's JSON Schema (for editor completion)."""
    import json

    from batchkling.manifest import manifest_json_schema

    click.echo(json.dumps(manifest_json_schema(), indent=2))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--speed", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Render-time divisor: 60 makes a one-minute render take one second.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--faults", default="none", show_default=True,
              help="A named fault profile, or a YAML/JSON file of simulator settings.")
@click.option("--api-key", default=None, help="Require this bearer key on the ImaRouter shape.")
@click.option("--access-key", default=None, help="Kling-shape JWT access key (default: documented).")
@click.option("--secret-key", default=None, help="Kling-shape JWT secret key (default: documented).")
def simulate(host: str, port: int, speed: float, seed: int, faults: str, api_key: str | None,
             access_key: str | None, secret_key: str | None) -> None:
    """Serve a local ImaRouter- and Kling-compatible API with faults on demand."""
    from batchkling.simulator import serve_forever

    try:
        serve_forever(host=host, port=port, speed=speed, seed=seed, faults=faults,
                      api_key=api_key, access_key=access_key, secret_key=secret_key)
    except BatchklingError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="batchkling")


if __name__ == "__main__":
    main()
