"""End-of-run files at scale: results.csv and report.html of a 100,000-job run, and the page in
Chromium.

Run: ``python tests/bench/bench_report.py [--jobs 100000] [--no-browser]``

A store of ``--jobs`` finished jobs (a 4-variable matrix: product × size × mode × take, real
prompts, every 20th job failed, every video pointing at one real clip) is made once with bulk
SQL. Then, each in a fresh child process so that its peak RSS is its own:

* ``results.csv``  — ``write_results`` (the speed engineer's streaming CSV);
* ``report.html``  — ``write_report``, streamed from the store a page at a time;
* both, as the end of a run writes them: one pass over the jobs feeds the page and the CSV.

Each child prints the wall and CPU time of the write (CPU time is what a loaded machine does
not inflate), its resident memory just before writing (the interpreter, batchkling and an open
store) and its peak RSS after. Then headless Chromium opens the page and the
time from navigation to the first screenful of cards (``document.body.dataset.ready``) is
measured, with the page's size.

Targets (issue #19): the end-of-run files in ≤ 10 s at 100,000 jobs, the page open in Chromium
in ≤ 3 s, memory flat in the number of jobs (compare ``--jobs 10000``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "batchkling" / "simulator" / "assets"
PRODUCTS = ["watch", "sneaker", "perfume", "headphones", "handbag", "lamp", "chair", "bottle",
            "camera", "phone"]
SIZES = ["16:9", "9:16", "1:1"]
MODES = ["std", "pro"]


def build(workdir: Path, jobs: int) -> None:
    """A finished run of ``jobs`` jobs in ``workdir``, made with bulk SQL."""
    import anyio

    from batchkling.store.sqlite import SqliteStore

    async def schema() -> None:
        async with SqliteStore(workdir / "batchkling.db") as store:
            await store.save_run("big", manifest_path="big.yaml", manifest_text=None,
                                 config_json="{}", provider="imarouter",
                                 base_url="http://127.0.0.1", simulated=True, now=1e9)
            await store.set_run_state("big", "finished", None, 1e9 + 3600)

    anyio.run(schema, backend="asyncio")
    videos = workdir / "big" / "videos"
    videos.mkdir(parents=True)
    clip = videos / "sample.mp4"
    shutil.copyfile(ASSETS / "sample_16x9.mp4", clip)
    from batchkling.models import JobSpec

    rows = []
    per_take = len(PRODUCTS) * len(SIZES) * len(MODES)
    for i in range(jobs):
        product = PRODUCTS[i % len(PRODUCTS)]
        size = SIZES[i // len(PRODUCTS) % len(SIZES)]
        mode = MODES[i // (len(PRODUCTS) * len(SIZES)) % len(MODES)]
        take = str(i // per_take)
        spec = JobSpec(job_id=f"{product}-{size.replace(':', 'x')}-{mode}-{take}",
                       model="kling-v2-6", duration=5, size=size, mode=mode,
                       prompt=f"{product} commercial on dark marble, slow orbit, soft key light,"
                              f" premium cinematic pacing, take {take}",
                       variables={"product": product, "size": size, "mode": mode,
                                  "take": take}, group="{product}-{size:slug}-{mode}-{take}")
        failed = i % 20 == 7
        rows.append((
            "big", spec.job_id, i, spec.to_json(), spec.fingerprint,
            "failed" if failed else "downloaded", 1, f"task-{i}",
            None if failed else str(clip), None if failed else 0.25,
            "CONTENT_POLICY" if failed else None,
            "The prompt was rejected by the safety filter." if failed else None,
            1e9 + i * 0.03, 1e9 + i * 0.03 + 90, None if failed else 90.0, 1e9 + i * 0.03 + 95,
        ))
    con = sqlite3.connect(workdir / "batchkling.db")
    with con:
        con.executemany(
            "INSERT INTO jobs (run_id, job_id, seq, spec_json, fingerprint, state, attempt,"
            " task_id, video_path, cost_usd, error_code, error_message, submitted_at,"
            " completed_at, render_seconds, updated_at) VALUES"
            " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    # A run's database is checkpointed as it goes; a bulk insert leaves a 100 MB WAL that the
    # first reader would pay for (and be measured paying for).
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import anyio
from batchkling.outputs.report import write_report
from batchkling.outputs.results import ResultsWriter, write_results
from batchkling.store.sqlite import SqliteStore

workdir, what = Path(sys.argv[1]), sys.argv[2]

async def main():
    async with SqliteStore(workdir / "batchkling.db") as store:
        await store.counts("big")
        with open("/proc/self/statm") as fh:  # resident now, not the peak so far
            before = int(fh.read().split()[1]) * resource.getpagesize() / 1024
        start = time.perf_counter()
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        if what == "csv":
            await write_results(store, "big", workdir / "big" / "results.csv", download=True)
        elif what == "report":
            await write_report(store, "big", workdir / "big" / "report.html", workdir=workdir)
        else:  # as the end of a run writes them: one pass over the jobs feeds both
            with await ResultsWriter.start(store, "big", workdir / "big" / "results.csv",
                                           download=True) as results:
                await write_report(store, "big", workdir / "big" / "report.html",
                                   workdir=workdir, results=results)
                results.finish()
        took = time.perf_counter() - start
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    # VmHWM, not ru_maxrss: that one carries over from the parent across fork and exec.
    with open("/proc/self/status") as fh:
        after = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": took, "cpu_seconds": cpu_s, "rss_before_mb": before / 1024,
                      "peak_rss_mb": after / 1024}))

anyio.run(main, backend="asyncio")
"""


def measure(workdir: Path, what: str) -> dict[str, float]:
    """Write the files ``what`` names in a fresh child; its time and RSS."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(workdir), what], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return dict(json.loads(out.stdout))


def open_in_chromium(page: Path, tries: int = 3) -> list[float]:
    """Seconds from navigation to the first cards drawn, in headless Chromium (fresh tab)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium") or shutil.which("chromium-browser"))
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--mute-audio", "--window-size=1440,900"):
        options.add_argument(flag)
    options.page_load_strategy = "none"
    driver = webdriver.Chrome(options=options,
                              service=Service(executable_path=shutil.which("chromedriver")))
    times = []
    try:
        for _ in range(tries):
            driver.get("about:blank")
            start = time.perf_counter()
            driver.get(page.as_uri())
            WebDriverWait(driver, 60, poll_frequency=0.02).until(lambda d: d.execute_script(
                "return document.body && document.body.dataset.ready === '1'"))
            times.append(time.perf_counter() - start)
            cards = driver.execute_script("return document.querySelectorAll('article').length")
            assert cards > 0, "no cards drawn"
    finally:
        driver.quit()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "jobs"
        workdir.mkdir()
        start = time.perf_counter()
        build(workdir, args.jobs)
        print(f"store of {args.jobs:,} jobs built in {time.perf_counter() - start:.1f} s")
        for what in ("csv", "report", "both"):
            m = measure(workdir, what)
            print(f"{what:>7}: {m['seconds']:6.2f} s wall, {m['cpu_seconds']:6.2f} s CPU   "
                  f"RSS before {m['rss_before_mb']:5.0f} MB"
                  f"   peak {m['peak_rss_mb']:5.0f} MB")
        page = workdir / "big" / "report.html"
        print(f"report.html: {page.stat().st_size / 1e6:.1f} MB")
        if not args.no_browser:
            times = open_in_chromium(page)
            print("Chromium, navigation to first cards: "
                  + ", ".join(f"{t:.2f} s" for t in times))


if __name__ == "__main__":
    main()
