"""The contact sheet of a run whose videos live only in a bucket, in a real headless Chromium:
every player loads its clip through a pre-signed link to the S3 test server and plays it.

Skips like tests/test_report_browser.py without chromium, chromedriver or selenium (CI sets
``BATCHKLING_REQUIRE_BROWSER=1`` to make that a failure).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_KEY
from s3server import MotoS3Server, make_bucket
from test_report_browser import CHROMEDRIVER, CHROMIUM, FLAGS, MISSING

from batchkling.testing import VirtualSim, write_manifest

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING) + " (CI installs them)"),
    pytest.mark.timeout(120),
]

AWS = {"AWS_ACCESS_KEY_ID": "AKIABROWSERTEST00001", "AWS_SECRET_ACCESS_KEY": "browser/secret",
       "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory: pytest.TempPathFactory,
               s3_server: MotoS3Server) -> tuple[Path, str]:
    """A three-job run (16:9, 9:16, 1:1) whose videos are only in the bucket; its report."""
    folder = tmp_path_factory.mktemp("run")
    bucket = make_bucket(s3_server.endpoint_url)
    env = {"BATCHKLING_TEST_KEY": TEST_KEY, **AWS, "AWS_ENDPOINT_URL": s3_server.endpoint_url,
           "HOME": str(folder)}
    sim = VirtualSim(env=env)
    jobs = [{"id": f"clip-{size.replace(':', 'x')}", "prompt": "a shot", "size": size}
            for size in ("16:9", "9:16", "1:1")]
    manifest = write_manifest(folder, jobs, name="bucketed", base_url=sim.base_url,
                              output={"store": f"s3://{bucket}/team/"})
    summary = asyncio.run(sim.run(manifest, folder / "jobs"))
    assert summary.exit_code == 0
    report = folder / "jobs" / "bucketed" / "report.html"
    assert not list((folder / "jobs" / "bucketed").rglob("*.mp4"))  # only in the bucket
    return report, s3_server.endpoint_url


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-s3')}")
    options.add_argument("--autoplay-policy=no-user-gesture-required")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.page_load_strategy = "eager"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_players_play_from_presigned_links(chromium: Any, stored_run: tuple[Path, str]) -> None:
    """Each card's player points at a pre-signed URL of the bucket, reads the clip's size and
    plays; the page says when the links expire; the console stays clean."""
    from selenium.webdriver.support.ui import WebDriverWait

    report, endpoint = stored_run
    chromium.get(report.as_uri())
    WebDriverWait(chromium, 20).until(lambda d: d.execute_script(
        "const v = Array.from(document.querySelectorAll('video'));"
        "return v.length === 3 && v.every(x => x.readyState >= 1);"))
    players = chromium.execute_script(
        "return Array.from(document.querySelectorAll('video')).map(v => "
        "[v.closest('article').dataset.job, v.currentSrc, v.videoWidth, v.videoHeight]);")
    shape = {}
    for job, src, width, height in players:
        assert src.startswith(f"{endpoint}/") and f"/team/bucketed/{job}.mp4?" in src
        assert "X-Amz-Signature=" in src and "X-Amz-Expires=86400" in src
        shape[job] = (width, height)
    assert shape["clip-16x9"][0] > shape["clip-16x9"][1]
    assert shape["clip-9x16"][0] < shape["clip-9x16"][1]
    chromium.execute_script("document.querySelector('video').play();")
    WebDriverWait(chromium, 20).until(lambda d: d.execute_script(
        "return document.querySelector('video').currentTime > 0.2;"))
    note = chromium.execute_script("return document.querySelector('p.links').textContent;")
    assert "expire" in note and "batchkling report bucketed" in note
    severe = [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
