"""The contact sheet in a real headless Chromium: filters, grouping, sorting, search, no errors.

Needs Debian's ``chromium`` and ``chromium-driver`` and ``selenium`` from PyPI. CI installs all
three and sets ``BATCHKLING_REQUIRE_BROWSER=1``, which turns the skip into a failure. Set
``BATCHKLING_REPORT_SCREENSHOT`` to a path to also save a full-page screenshot of the 24-job
report at 1440 px wide (this is how ``docs/report.png`` is made).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report import HOSTILE, build_matrix_run

from batchkling.outputs.report import write_report
from batchkling.store.sqlite import SqliteStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401  (only probing whether it is installed)

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

MISSING = [reason for reason, missing in (
    ("selenium is not installed (pip install selenium)", not HAVE_SELENIUM),
    ("no chromium binary (apt-get install chromium)", CHROMIUM is None),
    ("no chromedriver binary (apt-get install chromium-driver)", CHROMEDRIVER is None),
) if missing]
if MISSING and os.environ.get("BATCHKLING_REQUIRE_BROWSER"):
    # CI sets this so that a broken install fails loudly instead of skipping quietly.
    pytest.fail("; ".join(MISSING), pytrace=False)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING) + " (CI installs them)"),
]

#: Flags for a quiet, offline, throwaway browser.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--mute-audio", "--window-size=1440,900")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-job matrix run with real clips, its report written."""
    workdir = tmp_path_factory.mktemp("jobs")

    async def build() -> Path:
        run_dir = await build_matrix_run(workdir)
        async with SqliteStore(workdir / "batchkling.db") as store:
            return await write_report(store, "spring-ads", run_dir / "report.html")

    return asyncio.run(build())


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The page's script runs at the end of <body>: no need to wait for every clip to load.
    options.page_load_strategy = "eager"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    # Collect uncaught errors from the first script on, before the page's own code runs.
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "window.__errors = [];"
        "window.addEventListener('error', function (e) { window.__errors.push(String("
        "e.message || (e.target && e.target.src) || e)); }, true);"
    )})
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any, report: Path) -> Iterator[Any]:
    """The report freshly loaded; afterwards, asserts the console stayed clean."""
    browser.get(report.as_uri())
    browser.get_log("browser")  # drop anything left from an earlier test
    yield browser
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    assert browser.execute_script("return window.__errors") == []


def visible_ids(driver: Any) -> list[str]:
    """Job ids of the cards a person can see, in page order."""
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll('article.card'))"
        ".filter(c => c.offsetParent !== null).map(c => c.dataset.job);"))


def headings(driver: Any) -> list[str]:
    """The visible group headings' first line (the group name)."""
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll('section.group'))"
        ".filter(s => !s.hidden).map(s => s.querySelector('h2').firstChild.textContent);"))


def choose(driver: Any, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def chip(driver: Any, status: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"label.chip.st-{status}")


class TestReportInBrowser:
    def test_every_card_shows_without_errors(self, page: Any) -> None:
        """All 24 cards render, grouped by product, and the script reports what it shows."""
        from selenium.webdriver.common.by import By

        assert len(visible_ids(page)) == 24
        assert headings(page) == ["product: watch", "product: sneaker", "product: perfume",
                                  "product: headphones"]
        assert page.find_element(By.ID, "shown").text == "showing 24 of 24"

    def test_videos_load_from_relative_paths(self, page: Any) -> None:
        """The players find their clips next to the page and read their first frame."""
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(page, 10).until(lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('video'))"
            ".every(v => v.readyState >= 1);"))
        sizes = page.execute_script(
            "return Array.from(document.querySelectorAll('video'))"
            ".map(v => [v.closest('article').dataset.job, v.videoWidth, v.videoHeight]);")
        assert len(sizes) == 16
        shape = {job: (w, h) for job, w, h in sizes}
        w, h = shape["watch-9x16-std"]
        assert h > w
        w, h = shape["watch-16x9-std"]
        assert w > h

    def test_status_chip_hides_and_shows_cards(self, page: Any) -> None:
        """Unticking a status hides exactly its cards; ticking it again brings them back."""
        chip(page, "succeeded").click()
        shown = visible_ids(page)
        assert len(shown) == 7
        statuses = page.execute_script(
            "return Array.from(document.querySelectorAll('article.card'))"
            ".filter(c => c.offsetParent !== null).map(c => c.dataset.status);")
        assert "succeeded" not in statuses
        assert "product: watch" not in headings(page)  # every watch job succeeded
        chip(page, "succeeded").click()
        assert len(visible_ids(page)) == 24

    def test_group_by_size_then_status(self, page: Any) -> None:
        """Grouping by size gives one section per size; by status, in the fixed order."""
        choose(page, "group", "var:size")
        assert headings(page) == ["size: 16:9", "size: 9:16", "size: 1:1"]
        assert len(visible_ids(page)) == 24
        choose(page, "group", "status")
        assert headings(page) == ["status: succeeded", "status: failed", "status: timed_out",
                                  "status: unknown", "status: pending"]
        choose(page, "group", "")
        assert headings(page) == ["All jobs"]

    def test_sort_within_groups_and_reverse(self, page: Any) -> None:
        """Sorting by mode puts std before pro inside each product; ↑/↓ reverses it."""
        from selenium.webdriver.common.by import By

        choose(page, "sort", "var:mode")
        watch = [j for j in visible_ids(page) if j.startswith("watch-")]
        assert watch == ["watch-16x9-pro", "watch-9x16-pro", "watch-1x1-pro",
                         "watch-16x9-std", "watch-9x16-std", "watch-1x1-std"]
        page.find_element(By.ID, "dir").click()
        watch = [j for j in visible_ids(page) if j.startswith("watch-")]
        assert watch[:3] == ["watch-16x9-std", "watch-9x16-std", "watch-1x1-std"]
        choose(page, "sort", "seq")

    def test_search_filters_cards(self, page: Any) -> None:
        """Typing filters on prompt, id and error text; no match shows a message."""
        from selenium.webdriver.common.by import By

        box = page.find_element(By.ID, "q")
        box.send_keys("content_policy")
        assert sorted(visible_ids(page)) == ["perfume-16x9-pro", "sneaker-9x16-pro"]
        box.clear()
        box.send_keys("aero 9x16")
        assert sorted(visible_ids(page)) == ["sneaker-9x16-pro", "sneaker-9x16-std"]
        box.clear()
        box.send_keys("no such thing")
        assert visible_ids(page) == []
        assert page.find_element(By.ID, "empty").is_displayed()

    def test_problem_reason_filters_to_its_jobs(self, page: Any) -> None:
        """Clicking a reason in the summary shows just the jobs that failed that way."""
        from selenium.webdriver.common.by import By

        page.find_element(By.CSS_SELECTOR, "button.reason[data-query=RENDER_ERROR]").click()
        assert visible_ids(page) == ["perfume-1x1-std"]

    def test_view_survives_a_reload(self, page: Any) -> None:
        """Filters, grouping and search live in the URL fragment, so a reload keeps them."""
        from selenium.webdriver.common.by import By

        choose(page, "group", "var:mode")
        chip(page, "failed").click()
        page.find_element(By.ID, "q").send_keys("sneaker")
        page.refresh()
        assert headings(page) == ["mode: std", "mode: pro"]
        assert page.find_element(By.ID, "q").get_attribute("value") == "sneaker"
        assert len(visible_ids(page)) == 5

    def test_hostile_prompt_is_text(self, page: Any) -> None:
        """Markup in a prompt is shown literally and never runs."""
        from selenium.common.exceptions import NoAlertPresentException
        from selenium.webdriver.common.by import By

        prompt = page.find_element(By.CSS_SELECTOR, "article[data-job='watch-1x1-pro'] .prompt")
        assert prompt.text.startswith(HOSTILE)
        with pytest.raises(NoAlertPresentException):
            page.switch_to.alert.text  # noqa: B018  (reading it is how selenium probes)
        assert page.execute_script("return document.querySelectorAll('main script').length") == 0

    def test_state_badge_says_finished_like_status(self, page: Any) -> None:
        """The run's badge reads "finished" for a run whose last invocation ended."""
        from selenium.webdriver.common.by import By

        badge = page.find_element(By.ID, "runstate")
        assert badge.text == "finished" and badge.get_attribute("data-state") == "finished"
        assert "still going" not in page.find_element(By.TAG_NAME, "header").text

    def test_cards_take_the_shape_of_their_video(self, page: Any) -> None:
        """A 9:16 clip sits in a 9:16 frame (no pillarbox): the frame's shape is the clip's,
        and a 16:9 card's frame stays 16:9."""
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(page, 10).until(lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('video'))"
            ".every(v => v.readyState >= 1);"))
        shapes = page.execute_script(
            "return Object.fromEntries(Array.from(document.querySelectorAll('article.card'))"
            ".map(c => { const m = c.querySelector('.media').getBoundingClientRect();"
            " const v = c.querySelector('video');"
            " return [c.dataset.job, [m.width, m.height, v ? v.videoWidth : 0,"
            " v ? v.videoHeight : 0]]; }));")
        width, height, clip_w, clip_h = shapes["watch-9x16-std"]
        assert height > width
        assert height / width == pytest.approx(clip_h / clip_w, rel=0.02)
        assert height / width == pytest.approx(16 / 9, rel=0.02)
        width, height, clip_w, clip_h = shapes["watch-16x9-std"]
        assert width / height == pytest.approx(16 / 9, rel=0.02)
        width, height, _w, _h = shapes["headphones-9x16-std"]  # a placeholder, shaped too
        assert height / width == pytest.approx(16 / 9, rel=0.02)
        width, height, _w, _h = shapes["watch-1x1-std"]
        assert height == pytest.approx(width, rel=0.02)

    def test_card_shows_parameters_timings_and_attempts(self, page: Any) -> None:
        """A card names model, duration, size, mode, kind, cost, render time and attempts."""
        from selenium.webdriver.common.by import By

        card = page.find_element(By.CSS_SELECTOR, "article[data-job='watch-16x9-pro']")
        assert "kling-v2-6 · 5 s · 16:9 · pro · text → video" in card.text
        meta = card.find_element(By.CSS_SELECTOR, ".meta").text.split()
        assert "$0.35" in meta and "77" in meta and "12:00:08" in meta
        unknown = page.find_element(By.CSS_SELECTOR, "article[data-job='headphones-1x1-pro']")
        assert "Next: batchkling retry spring-ads --unknown" in unknown.text


class TestLargeReport:
    def test_cards_are_drawn_a_page_at_a_time(self, browser: Any,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
        """A 1,000-job page draws the first cards at once and more as the reader scrolls;
        the summary stays at the top and the filters still count every job."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        dest = _big_report(tmp_path_factory.mktemp("big"), 1000)
        browser.get(dest.as_uri())
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(
            "return document.body.dataset.ready === '1'"))
        drawn = len(browser.find_elements(By.CSS_SELECTOR, "article.card"))
        assert 0 < drawn < 200
        assert browser.find_element(By.ID, "shown").text == "showing 1000 of 1000"
        assert browser.execute_script(
            "return document.querySelector('header.top').getBoundingClientRect().top") == 0
        browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        WebDriverWait(browser, 10).until(lambda d: len(d.find_elements(
            By.CSS_SELECTOR, "article.card")) > drawn)
        browser.find_element(By.ID, "q").send_keys("job-0999")
        assert visible_ids(browser) == ["job-0999"]


def _big_report(workdir: Path, n: int) -> Path:
    """A run of ``n`` finished text jobs, its report written."""
    from batchkling.models import JobSpec, JobState

    async def build() -> Path:
        async with SqliteStore(workdir / "batchkling.db") as store:
            await store.save_run("big", manifest_path=None, manifest_text=None, config_json="{}",
                                 provider="imarouter", base_url="http://127.0.0.1",
                                 simulated=True, now=0.0)
            specs = [JobSpec(job_id=f"job-{i:04d}", model="kling-v2-6", prompt=f"shot {i}",
                             duration=5, size=("16:9", "9:16")[i % 2]) for i in range(n)]
            await store.sync_jobs("big", added=list(enumerate(specs)), changed=[],
                                  reordered=[], removed=[], now=0.0)
            for spec in specs:
                await store.transition("big", spec.job_id, JobState.FAILED, now=1.0, event="e",
                                       error_code="X")
            await store.set_run_state("big", "finished", None, 2.0)
            return await write_report(store, "big", workdir / "big" / "report.html")

    return asyncio.run(build())


def test_screenshot(browser: Any, report: Path) -> None:
    """With BATCHKLING_REPORT_SCREENSHOT set, save the whole page as a PNG for the docs."""
    import base64

    target = os.environ.get("BATCHKLING_REPORT_SCREENSHOT")
    if not target:
        pytest.skip("set BATCHKLING_REPORT_SCREENSHOT=docs/report.png to refresh the screenshot")
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(report.as_uri())
    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    # Chromium paints video frames only inside the window: make the window the whole page.
    browser.set_window_size(1440, height + 200)
    try:
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('video'))"
            ".every(v => v.readyState >= 2);"))
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1440, "height": height, "scale": 1},
        })
    finally:
        browser.set_window_size(1440, 900)
    # A 256-colour palette keeps the PNG small enough for the repository; text stays sharp.
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    image.quantize(colors=256, dither=Image.Dither.NONE).save(target, optimize=True)
