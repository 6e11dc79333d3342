"""The results CSV: statuses, columns, escaping, atomic writes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from batchkling.models import JobSpec, JobState
from batchkling.outputs.report import write_report
from batchkling.outputs.results import (
    COLUMNS,
    ResultsWriter,
    csv_status,
    escape_cell,
    read_results,
    write_results,
)
from batchkling.store.sqlite import SqliteStore


@pytest.mark.parametrize("text", ["=1+1", "+cmd", "-2", "@SUM(A1)", "\tx", "\rx"])
def test_formula_cells_are_escaped(text: str) -> None:
    """Cells a spreadsheet would run as formulas are prefixed with a quote."""
    assert escape_cell(text) == "'" + text


def test_plain_cells_pass() -> None:
    """Ordinary text and numbers are unchanged."""
    assert escape_cell("a cat") == "a cat"
    assert escape_cell(3) == 3


@pytest.mark.parametrize(("state", "download", "expected"), [
    (JobState.DOWNLOADED, True, "succeeded"),
    (JobState.SUCCEEDED, False, "succeeded"),
    (JobState.SUCCEEDED, True, "pending"),
    (JobState.RUNNING, True, "pending"),
    (JobState.SUBMITTING, True, "pending"),
    (JobState.FAILED, True, "failed"),
    (JobState.TIMED_OUT, True, "timed_out"),
    (JobState.UNKNOWN, True, "unknown"),
    (JobState.SKIPPED, True, "skipped"),
])
def test_status_vocabulary(state: JobState, download: bool, expected: str) -> None:
    """Every DB state maps to one of the six documented CSV statuses."""
    assert csv_status(state, download=download) == expected


async def test_csv_has_columns_vars_and_escaping(tmp_path: Path) -> None:
    """Documented columns, then var.* columns; hostile text is neutralised."""
    async with SqliteStore(tmp_path / "db.sqlite") as store:
        await store.save_run("r", manifest_path=None, manifest_text=None, config_json="{}",
                             provider="imarouter", base_url="http://x", simulated=False,
                             now=1.0)
        specs = [
            JobSpec(job_id="a", model="kling-v2-6", prompt="=HYPERLINK(\"http://evil\")",
                    duration=5, size="16:9", variables={"product": "watch", "size": "16:9"}),
            JobSpec(job_id="b", model="kling-v2-6", prompt="fine", duration=5, size="1:1"),
        ]
        await store.sync_jobs("r", added=list(enumerate(specs)), changed=[], reordered=[],
                              removed=[], now=1.0)
        await store.transition("r", "b", JobState.FAILED, now=2.0, event="job.failed",
                               error_message="-bad things", error_code="@x")
        dest = await write_results(store, "r", tmp_path / "out" / "results.csv", download=True)
    with open(dest, newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header[: len(COLUMNS)]) == COLUMNS
    assert header[len(COLUMNS):] == ["var.product", "var.size"]
    rows = read_results(dest)
    assert rows[0]["prompt"].startswith("'=")
    assert rows[0]["var.product"] == "watch"
    assert rows[1]["error_message"] == "'-bad things" and rows[1]["error_code"] == "'@x"
    assert rows[1]["status"] == "failed"
    assert not list((tmp_path / "out").glob(".results-*"))


def test_cost_reads_as_usd_or_as_units_with_the_estimate() -> None:
    from batchkling.models import describe_cost

    assert describe_cost(1.05, 0.0, 1.05) == "$1.05"
    assert describe_cost(0.0, 7.5, 0.75).startswith("7.5 units (the provider reports units")
    assert "about $0.75" in describe_cost(0.0, 7.5, 0.75)
    assert describe_cost(0.35, 2.5, 0.6).startswith("$0.35 + 2.5 units")


def _count_pages(store: SqliteStore) -> list[int]:
    """How many jobs each of the store's page reads returns, from now on."""
    pages: list[int] = []
    jobs_in = store.jobs_in

    async def counting(*args: object, **kwargs: object) -> list[object]:
        rows = await jobs_in(*args, **kwargs)  # type: ignore[arg-type]
        pages.append(len(rows))
        return rows  # type: ignore[return-value]

    store.jobs_in = counting  # type: ignore[method-assign]
    return pages


async def test_csv_is_one_pass_and_a_late_variable_gets_its_column(tmp_path: Path) -> None:
    """The CSV reads the store once, a page at a time; a variable that first appears on a
    later job still gets its column (earlier rows read it as empty)."""
    async with SqliteStore(tmp_path / "db.sqlite") as store:
        await store.save_run("r", manifest_path=None, manifest_text=None, config_json="{}",
                             provider="imarouter", base_url="http://x", simulated=False,
                             now=1.0)
        specs = [JobSpec(job_id=f"j{i}", model="kling-v2-6", prompt=f"p{i}", duration=5,
                         size="16:9", variables={"product": f"p{i}",
                                                 **({"take": "7"} if i == 1200 else {})})
                 for i in range(1500)]
        await store.sync_jobs("r", added=list(enumerate(specs)), changed=[], reordered=[],
                              removed=[], now=1.0)
        pages = _count_pages(store)
        dest = await write_results(store, "r", tmp_path / "results.csv", download=True)
    assert sum(pages) == 1500  # every job read once
    rows = read_results(dest)
    assert list(rows[0])[-2:] == ["var.product", "var.take"]
    assert rows[1200]["var.take"] == "7"
    assert rows[0]["var.take"] in ("", None) and rows[1499]["var.product"] == "p1499"


async def test_the_end_of_a_run_reads_its_jobs_once_for_both_files(tmp_path: Path) -> None:
    """The report's pass feeds the CSV: every job read once for both files (at 100,000 jobs a
    pass is seconds), and the CSV is the one ``write_results`` writes on its own."""
    async with SqliteStore(tmp_path / "db.sqlite") as store:
        await store.save_run("r", manifest_path=None, manifest_text=None, config_json="{}",
                             provider="imarouter", base_url="http://x", simulated=False,
                             now=1.0)
        specs = [JobSpec(job_id=f"j{i}", model="kling-v2-6", prompt=f"=p{i}", duration=5,
                         size="16:9", mode="pro" if i % 2 else None,
                         variables={"product": f"p{i}", **({"take": "7"} if i == 1200 else {})})
                 for i in range(1500)]
        await store.sync_jobs("r", added=list(enumerate(specs)), changed=[], reordered=[],
                              removed=[], now=1.0)
        await store.transition("r", "j3", JobState.FAILED, now=2.0, event="job.failed",
                               error_message="-bad", error_code="X")
        alone = await write_results(store, "r", tmp_path / "alone.csv", download=True)
        pages = _count_pages(store)
        with await ResultsWriter.start(store, "r", tmp_path / "run" / "results.csv",
                                       download=True) as results:
            await write_report(store, "r", tmp_path / "run" / "report.html", results=results)
            joint = results.finish()
    assert sum(pages) == 1500  # one pass, not one per file
    assert joint.read_bytes() == alone.read_bytes()
    assert (tmp_path / "run" / "report.html").stat().st_size > 0
    # No scratch file of either left behind.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.html", "results.csv"]
