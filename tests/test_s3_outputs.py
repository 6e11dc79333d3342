"""Runs whose videos go to an S3-compatible bucket (moto's server on loopback, started here).

Every video lands at ``<prefix>/<run_id>/<job_id>.mp4`` with the checksum the store confirmed;
a job is ``downloaded`` only once it is there; a kill between upload and commit is repaired by a
HEAD, not a second upload, and never by a second render; a failing store leaves jobs
``succeeded`` for ``resume``; a store that cannot be used stops the run before any create (exit
2); local images reach ImaRouter as pre-signed URLs; AWS keys reach no file and no output.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import TEST_KEY, cli_process, finish_process, wait_until_running
from s3server import FaultProxy, MotoS3Server, make_bucket, s3_client

from batchkling.outputs.results import read_results
from batchkling.simulator import SimulatorServer
from batchkling.testing import VirtualSim, write_manifest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_manifests"
CLI_SPEED = "400"
#: Distinctive fake credentials (moto accepts any): the sweep greps every output for them.
ACCESS_KEY_ID = "AKIASWEEP7F3A9C2E51D8"
SECRET_KEY = "sweep/SECRET+b06d4e1f9a2c7e33"
AWS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
       "AWS_REGION": "us-east-1"}
QUICKSTART_JOBS = ("neon-alley", "lantern-glow", "handbag-first-last")


def _aws(endpoint: str, home: Path) -> dict[str, str]:
    # HOME: a folder without ~/.aws, so only what the test sets can supply credentials.
    return {**AWS, "AWS_ENDPOINT_URL": endpoint, "HOME": str(home)}


def _cli(*args: str, env: dict[str, str], crash_at: str | None = None
         ) -> subprocess.Popen[bytes]:
    # Only the test's own AWS settings: none inherited from the machine.
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return cli_process(*args, speed=CLI_SPEED, env=env, crash_at=crash_at, stdout=True,
                       base_env=base)


_finish = finish_process


def _quickstart(folder: Path, sim: SimulatorServer, **output: Any) -> Path:
    """The sample quickstart (text, image, first-last frame) against ``sim``."""
    data = yaml.safe_load((SAMPLES / "quickstart.yaml").read_text(encoding="utf-8"))
    data["provider"] = {"name": "imarouter", "base_url": sim.base_url,
                        "api_key_env": "BATCHKLING_TEST_KEY"}
    if output:
        data["output"] = output
    shutil.copytree(SAMPLES / "assets", folder / "assets", dirs_exist_ok=True)
    path = folder / "quickstart.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _objects(endpoint: str, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    client = s3_client(endpoint)
    found = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o for o in found}


def _sha256(endpoint: str, bucket: str, key: str) -> str:
    body = s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
    return hashlib.sha256(body).hexdigest()


def _db(workdir: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(workdir / "batchkling.db")
    try:
        return list(con.execute(sql))
    finally:
        con.close()


def _video_puts(proxy: FaultProxy) -> dict[str, int]:
    """Answered PUTs per video key (the probe's marker and input images left out)."""
    counts: dict[str, int] = {}
    for record in proxy.records:
        path = record.path_qs.split("?")[0]
        if record.method == "PUT" and path.endswith(".mp4") and record.outcome.endswith(":200"):
            counts[path] = counts.get(path, 0) + 1
    return counts


def _assert_stored(endpoint: str, bucket: str, workdir: Path, run_id: str) -> None:
    """Every job marked downloaded has its object, with the recorded size, ETag and sha256."""
    rows = _db(workdir, "SELECT job_id, video_uri, video_size, video_sha256, video_etag FROM jobs"
               f" WHERE run_id = '{run_id}' AND state = 'downloaded'")
    client = s3_client(endpoint)
    for job_id, uri, size, sha, etag in rows:
        key = uri.removeprefix(f"s3://{bucket}/")
        assert key.endswith(f"{run_id}/{job_id}.mp4")
        head = client.head_object(Bucket=bucket, Key=key)
        assert (head["ContentLength"], head["ETag"].strip('"')) == (size, etag)
        assert _sha256(endpoint, bucket, key) == sha


class TestQuickstartInABucket:
    def test_videos_keys_checksums_csv_images_and_no_leaked_keys(
            self, tmp_path: Path, workdir: Path, simulator: Any,
            s3_bucket: tuple[str, str]) -> None:
        """The quickstart with output.store: each video at <prefix>/<run>/<job>.mp4 with the
        sha256 in the DB and CSV, `video_uri` in the CSV, no local copies, the three local images
        sent as pre-signed URLs of <prefix>/inputs/<sha256>.jpg (never base64), and the AWS keys
        in no file and no output."""
        endpoint, bucket = s3_bucket
        sim = simulator()
        manifest = _quickstart(tmp_path, sim, store=f"s3://{bucket}/team/ads/")
        code, out, err = _finish(_cli("run", str(manifest), "--workdir", str(workdir),
                                      env=_aws(endpoint, tmp_path)))
        assert code == 0, err
        stored = _objects(endpoint, bucket, "team/ads/quickstart/")
        assert set(stored) == {f"team/ads/quickstart/{job}.mp4" for job in QUICKSTART_JOBS}
        rows = {r["job_id"]: r for r in read_results(workdir / "quickstart" / "results.csv")}
        for job in QUICKSTART_JOBS:
            key = f"team/ads/quickstart/{job}.mp4"
            assert rows[job]["video_uri"] == f"s3://{bucket}/{key}"
            assert rows[job]["video_sha256"] == _sha256(endpoint, bucket, key)
            assert rows[job]["video_path"] == ""
        attempts = _db(workdir, "SELECT video_uri, video_size, video_sha256, video_etag"
                       " FROM attempts")
        assert len(attempts) == 3 and all(all(a) for a in attempts)
        assert not list((workdir / "quickstart").rglob("*.mp4"))  # keep_local: false
        _assert_stored(endpoint, bucket, workdir, "quickstart")

        stats = sim.stats()
        assert stats["image_forms"] == {"url": 3}
        inputs = _objects(endpoint, bucket, "team/ads/inputs/")
        assert len(inputs) == 3  # lantern, handbag first and last: each once, by content
        for url in stats["image_urls"]:
            assert re.search(r"/team/ads/inputs/[0-9a-f]{64}\.jpg\?.*X-Amz-Signature=", url)
            body = httpx.get(url).content
            assert any(body == p.read_bytes() for p in (tmp_path / "assets").glob("*.jpg"))

        _assert_no_keys(workdir, out + err)

    def test_keep_local_keeps_the_videos_and_the_report_plays_them(
            self, tmp_path: Path, workdir: Path, simulator: Any,
            s3_bucket: tuple[str, str]) -> None:
        """keep_local: true: the bucket and videos/ both hold each video; the page plays the
        local copy."""
        endpoint, bucket = s3_bucket
        sim = simulator()
        manifest = _quickstart(tmp_path, sim, store=f"s3://{bucket}/", keep_local=True)
        code, _, err = _finish(_cli("run", str(manifest), "--workdir", str(workdir),
                                    env=_aws(endpoint, tmp_path)))
        assert code == 0, err
        rows = read_results(workdir / "quickstart" / "results.csv")
        for row in rows:
            assert Path(row["video_path"]).is_file() and row["video_uri"].startswith("s3://")
        page = (workdir / "quickstart" / "report.html").read_text()
        # The cards are drawn from the page's job data (tests/test_report.py reads it so).
        assert '"video":"videos/neon-alley.mp4"' in page and "X-Amz-Signature" not in page


def _assert_no_keys(workdir: Path, console: str) -> None:
    """The secret key is nowhere; the key id only inside pre-signed links of the report."""
    assert SECRET_KEY not in console and ACCESS_KEY_ID not in console
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"run.log", "results.csv", "report.html", "batchkling.db"}
    for path in files:
        data = path.read_bytes().decode("utf-8", errors="replace")
        assert SECRET_KEY not in data, path
        assert "sweep%2FSECRET" not in data, path
        if path.name == "report.html":
            # SigV4 links carry the key id (never the secret) in X-Amz-Credential, by design.
            outside = data.replace(f"X-Amz-Credential={ACCESS_KEY_ID}", "")
            assert ACCESS_KEY_ID not in outside
        else:
            assert ACCESS_KEY_ID not in data, path


class TestCrashBetweenUploadAndCommit:
    @pytest.mark.timeout(180)
    def test_kill_after_upload_resume_checks_instead_of_uploading_again(
            self, tmp_path: Path, workdir: Path, simulator: Any, s3_server: MotoS3Server,
            s3_fault_proxy: FaultProxy) -> None:
        """SIGKILLed right after the store confirmed the second video: that job is not
        `downloaded`, every `downloaded` one is in the bucket; the resume adopts the uploaded
        object after a HEAD (one PUT per video in all), renders nothing twice, and a second
        resume uploads nothing."""
        endpoint = s3_server.endpoint_url
        bucket = make_bucket(endpoint)
        sim = simulator(speed=400)
        n = 4
        jobs = [{"id": f"clip-{i}", "prompt": f"shot {i}"} for i in range(n)]
        # One task at a time: at the crash exactly two uploads have been confirmed, however
        # loaded the machine (with four at once a third could finish in the same instant).
        manifest = write_manifest(tmp_path, jobs, name="crashy", base_url=sim.base_url,
                                  limits={"max_in_flight": 1, "submit_rate": 40,
                                          "task_timeout": "2h"},
                                  output={"store": f"s3://{bucket}/out/"})
        env = _aws(s3_fault_proxy.endpoint_url, tmp_path)
        proc = _cli("run", str(manifest), "--workdir", str(workdir), env=env,
                    crash_at="after_upload:2")
        wait_until_running(proc, workdir / "batchkling.db", "crashy")
        code, _, err = _finish(proc)
        assert code == -9, err  # SIGKILL at the crash point
        states = dict(_db(workdir, "SELECT job_id, state FROM jobs"))
        uploaded = {k.rsplit("/", 1)[1].removesuffix(".mp4")
                    for k in _objects(endpoint, bucket, "out/crashy/")}
        downloaded = {j for j, s in states.items() if s == "downloaded"}
        assert len(uploaded) == 2 and len(downloaded) == 1 and downloaded < uploaded
        (limbo,) = uploaded - downloaded
        assert states[limbo] == "succeeded"
        _assert_stored(endpoint, bucket, workdir, "crashy")

        code, _, err = _finish(_cli("resume", "crashy", "--workdir", str(workdir), env=env))
        assert code == 0, err
        assert set(dict(_db(workdir, "SELECT job_id, state FROM jobs")).values()) == {
            "downloaded"}
        _assert_stored(endpoint, bucket, workdir, "crashy")
        puts = _video_puts(s3_fault_proxy)
        assert len(puts) == n and set(puts.values()) == {1}, puts
        heads = [r for r in s3_fault_proxy.records
                 if r.method == "HEAD" and r.path_qs.endswith(f"/{limbo}.mp4")]
        assert len(heads) >= 2  # the resume's check, and the upload's own confirmation
        stats = sim.stats()
        assert stats["creates"] == n and stats["duplicate_keys"] == []

        code, _, err = _finish(_cli("resume", "crashy", "--workdir", str(workdir), env=env))
        assert code == 0, err
        assert _video_puts(s3_fault_proxy) == puts  # nothing confirmed is uploaded again
        assert sim.stats()["creates"] == n


    @pytest.mark.slow
    @pytest.mark.timeout(300)
    def test_sigkill_at_random_moments_with_uploads(
            self, tmp_path: Path, workdir: Path, simulator: Any, s3_server: MotoS3Server,
            s3_fault_proxy: FaultProxy) -> None:
        """Killed eight times at random moments, then resumed: every job is `downloaded` with
        its object in the bucket, each video was stored by exactly one answered PUT, and no
        idempotency key made two tasks."""
        import random
        import time

        endpoint = s3_server.endpoint_url
        bucket = make_bucket(endpoint)
        sim = simulator(speed=300)
        n = 24
        jobs = [{"id": f"clip-{i:02d}", "prompt": f"shot {i}"} for i in range(n)]
        manifest = write_manifest(tmp_path, jobs, name="killme", base_url=sim.base_url,
                                  limits={"max_in_flight": 6, "submit_rate": 40,
                                          "task_timeout": "2h"},
                                  output={"store": f"s3://{bucket}/k/"})
        env = _aws(s3_fault_proxy.endpoint_url, tmp_path)
        rng = random.Random(20261202)
        for _ in range(8):
            proc = _cli("run", str(manifest), "--workdir", str(workdir), env=env)
            wait_until_running(proc, workdir / "batchkling.db", "killme")
            time.sleep(rng.uniform(0.05, 0.8))
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
            _assert_stored(endpoint, bucket, workdir, "killme")
        code, _, err = _finish(_cli("resume", "killme", "--workdir", str(workdir), env=env))
        states = dict(_db(workdir, "SELECT job_id, state FROM jobs"))
        assert code in (0, 3), err
        assert set(states.values()) <= {"downloaded", "unknown"}, states
        _assert_stored(endpoint, bucket, workdir, "killme")
        puts = _video_puts(s3_fault_proxy)
        assert set(puts.values()) == {1}, puts
        assert len(puts) == sum(s == "downloaded" for s in states.values())
        assert sim.stats()["duplicate_keys"] == []
        assert not list(workdir.rglob("*.part"))


def _vsim_env(endpoint: str, home: Path) -> dict[str, str]:
    return {"BATCHKLING_TEST_KEY": TEST_KEY, **_aws(endpoint, home)}


class TestFailingStore:
    async def test_store_answering_500_then_recovering(
            self, tmp_path: Path, workdir: Path, s3_server: MotoS3Server,
            s3_fault_proxy: FaultProxy) -> None:
        """More 500s than the client's own retries absorb: the upload is tried again after a
        backoff, and every video ends in the bucket, each stored once."""
        bucket = make_bucket(s3_server.endpoint_url)
        sim = VirtualSim(env=_vsim_env(s3_fault_proxy.endpoint_url, tmp_path))
        manifest = sim.manifest(tmp_path, 2, output={"store": f"s3://{bucket}/v/"})
        s3_fault_proxy.fail_next(6, match=lambda m, p: m == "PUT" and ".mp4" in p)
        summary = await sim.run(manifest, workdir)
        assert summary.exit_code == 0 and summary.counts == {"succeeded": 2}
        injected = [r for r in s3_fault_proxy.records if r.outcome == "injected:500"]
        assert len(injected) == 6
        assert sorted(_video_puts(s3_fault_proxy).values()) == [1, 1]
        _assert_stored(s3_server.endpoint_url, bucket, workdir, "test-run")
        events = [e for (e,) in _db(workdir, "SELECT event FROM events")]
        assert "job.upload_failed" not in events

    async def test_upload_that_keeps_failing_stays_succeeded_then_resume_uploads(
            self, tmp_path: Path, workdir: Path, s3_server: MotoS3Server,
            s3_fault_proxy: FaultProxy) -> None:
        """A store down for good: the job stays `succeeded` with a reason naming `resume`, the
        run exits 3; once the store is back, `resume` uploads it without a new render."""
        bucket = make_bucket(s3_server.endpoint_url)
        sim = VirtualSim(env=_vsim_env(s3_fault_proxy.endpoint_url, tmp_path))
        manifest = sim.manifest(tmp_path, 1, output={"store": f"s3://{bucket}/v/"})
        s3_fault_proxy.fail_next(1000, match=lambda m, p: m == "PUT" and ".mp4" in p)
        summary = await sim.run(manifest, workdir)
        assert summary.exit_code == 3 and summary.counts == {"pending": 1}
        ((state, code, message, path),) = _db(
            workdir, "SELECT state, error_code, error_message, video_path FROM jobs")
        assert (state, code) == ("succeeded", "upload_failed")
        assert "HTTP 500" in message and "batchkling resume test-run" in message
        assert Path(path).is_file()  # kept for the resume
        row = read_results(workdir / "test-run" / "results.csv")[0]
        assert row["status"] == "pending" and "resume" in row["error_message"]

        s3_fault_proxy.clear()
        summary = await sim.resume("test-run", workdir)
        assert summary.exit_code == 0 and summary.counts == {"succeeded": 1}
        assert sim.stats()["creates"] == 1  # the render was not repeated
        _assert_stored(s3_server.endpoint_url, bucket, workdir, "test-run")
        assert not Path(path).exists()


    async def test_uploads_refused_mid_run_stop_the_creates(
            self, tmp_path: Path, workdir: Path, s3_server: MotoS3Server,
            s3_fault_proxy: FaultProxy) -> None:
        """The store starts refusing uploads (403) after the probe: the rendered job stays
        `succeeded` with the reason, no further task is paid for, and the run exits 3."""
        bucket = make_bucket(s3_server.endpoint_url)
        sim = VirtualSim(env=_vsim_env(s3_fault_proxy.endpoint_url, tmp_path))
        manifest = sim.manifest(tmp_path, 4, limits={"max_in_flight": 1},
                                output={"store": f"s3://{bucket}/v/"})
        s3_fault_proxy.fail_next(1000, status=403, match=lambda m, p: ".mp4" in p)
        summary = await sim.run(manifest, workdir)
        assert summary.exit_code == 3
        assert summary.stop_reason is not None and "refused an upload" in summary.stop_reason
        # The slot frees when a render ends, so one more task may start while the first
        # video uploads; after the refusal, nothing more.
        creates = sim.stats()["creates"]
        rows = _db(workdir, "SELECT state, error_code FROM jobs ORDER BY seq")
        assert creates <= 2
        assert rows[:creates] == [("succeeded", "upload_failed")] * creates
        assert [state for state, _ in rows[creates:]] == ["pending"] * (4 - creates)

    async def test_input_images_refused_stop_before_any_create(
            self, tmp_path: Path, workdir: Path, s3_server: MotoS3Server,
            s3_fault_proxy: FaultProxy) -> None:
        """An input image the store refuses to take: no create is sent (nothing falls back
        to a data URI), creates stop, the job waits in `pending` with the reason."""
        bucket = make_bucket(s3_server.endpoint_url)
        sim = VirtualSim(env=_vsim_env(s3_fault_proxy.endpoint_url, tmp_path))
        shutil.copytree(SAMPLES / "assets", tmp_path / "assets")
        manifest = write_manifest(tmp_path, [{"id": "lamp", "prompt": "glow",
                                              "image": "assets/lantern.jpg"}],
                                  base_url=sim.base_url, output={"store": f"s3://{bucket}/v/"})
        s3_fault_proxy.fail_next(1000, status=403, match=lambda m, p: "/inputs/" in p
                                 and m == "PUT")
        summary = await sim.run(manifest, workdir)
        assert summary.exit_code == 3 and "input image" in (summary.stop_reason or "")
        assert sim.stats()["create_requests"] == 0
        ((state, code),) = _db(workdir, "SELECT state, error_code FROM jobs")
        assert (state, code) == ("pending", "input_upload_failed")


class TestStoreCheckedBeforeAnyCreate:
    def _run(self, tmp_path: Path, workdir: Path, sim: SimulatorServer, store: str,
             env: dict[str, str], *extra: str) -> tuple[int, str]:
        manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}], name="probe",
                                  base_url=sim.base_url, output={"store": store})
        code, _, err = _finish(_cli("run", str(manifest), "--workdir", str(workdir), *extra,
                                    env=env))
        return code, err

    def test_bucket_without_write_permission(self, tmp_path: Path, workdir: Path,
                                             simulator: Any, s3_server: MotoS3Server) -> None:
        """Writes denied: exit 2 naming the bucket and the permission; the provider saw no
        create at all."""
        sim = simulator()
        bucket = make_bucket(s3_server.endpoint_url, writes_denied=True)
        code, err = self._run(tmp_path, workdir, sim, f"s3://{bucket}/p/",
                              _aws(s3_server.endpoint_url, tmp_path))
        assert code == 2, err
        assert "access denied" in err and "s3:PutObject" in err and "Nothing was submitted" in err
        assert "Traceback" not in err
        assert sim.stats()["create_requests"] == 0

    def test_missing_bucket(self, tmp_path: Path, workdir: Path, simulator: Any,
                            s3_server: MotoS3Server) -> None:
        """A bucket that does not exist: exit 2, no create."""
        sim = simulator()
        code, err = self._run(tmp_path, workdir, sim, "s3://no-such-bucket-anywhere/",
                              _aws(s3_server.endpoint_url, tmp_path))
        assert code == 2 and "bucket does not exist" in err and "create the bucket" in err
        assert sim.stats()["create_requests"] == 0

    def test_missing_credentials(self, tmp_path: Path, workdir: Path, simulator: Any,
                                 s3_server: MotoS3Server) -> None:
        """No AWS keys and no profile: exit 2 naming the variables; no request to anyone."""
        sim = simulator()
        env = {"AWS_ENDPOINT_URL": s3_server.endpoint_url, "HOME": str(tmp_path)}
        code, err = self._run(tmp_path, workdir, sim, "s3://some-bucket/", env)
        assert code == 2, err
        assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err and "Traceback" not in err
        assert sim.stats()["create_requests"] == 0

    def test_plain_http_endpoint_off_loopback(self, tmp_path: Path, workdir: Path,
                                              simulator: Any) -> None:
        """An http endpoint on another host is refused before any request (exit 2)."""
        sim = simulator()
        env = _aws("http://10.255.255.1:9000", tmp_path)
        code, err = self._run(tmp_path, workdir, sim, "s3://some-bucket/", env)
        assert code == 2 and "plain-http" in err and "allow_http" in err
        assert sim.stats()["create_requests"] == 0

    def test_bad_store_urls(self, tmp_path: Path, workdir: Path, simulator: Any,
                            s3_server: MotoS3Server) -> None:
        """A bad output.store is a manifest error with its line; a bad --output-store names
        the option. Both exit 2."""
        sim = simulator()
        code, err = self._run(tmp_path, workdir, sim, "https://bucket/x",
                              _aws(s3_server.endpoint_url, tmp_path))
        assert code == 2 and re.search(r"manifest\.yaml:\d+:\d+: output\.store:", err), err
        bucket = make_bucket(s3_server.endpoint_url)
        code, err = self._run(tmp_path, workdir, sim, f"s3://{bucket}/",
                              _aws(s3_server.endpoint_url, tmp_path), "--output-store",
                              "s3://Not_A_Bucket/")
        assert code == 2 and "--output-store:" in err and "bucket name" in err, err
        assert sim.stats()["create_requests"] == 0


class TestInputImages:
    def _images(self, folder: Path, **sections: Any) -> tuple[Path, list[dict[str, Any]]]:
        shutil.copytree(SAMPLES / "assets", folder / "assets", dirs_exist_ok=True)
        jobs = [{"id": "lantern", "prompt": "glow", "image": "assets/lantern.jpg"},
                {"id": "bag", "prompt": "turn", "image": "assets/handbag_first.jpg",
                 "image_tail": "assets/handbag_last.jpg"},
                {"id": "lantern-2", "prompt": "glow again", "image": "assets/lantern.jpg"}]
        return folder, jobs

    async def test_local_images_go_as_presigned_urls_uploaded_once(
            self, tmp_path: Path, workdir: Path, s3_bucket: tuple[str, str]) -> None:
        """With a store, ImaRouter gets URLs of <prefix>/inputs/<sha256>.jpg, never data URIs;
        an image used by two jobs is uploaded once."""
        endpoint, bucket = s3_bucket
        sim = VirtualSim(env=_vsim_env(endpoint, tmp_path))
        folder, jobs = self._images(tmp_path)
        manifest = write_manifest(folder, jobs, base_url=sim.base_url,
                                  output={"store": f"s3://{bucket}/p/"})
        summary = await sim.run(manifest, workdir)
        assert summary.exit_code == 0
        stats = sim.stats()
        assert stats["image_forms"] == {"url": 4}
        lantern = hashlib.sha256((folder / "assets" / "lantern.jpg").read_bytes()).hexdigest()
        assert sum(f"/p/inputs/{lantern}.jpg?" in u for u in stats["image_urls"]) == 2
        assert len(_objects(endpoint, bucket, "p/inputs/")) == 3

    async def test_without_a_store_data_uris_stay_with_one_warning(
            self, tmp_path: Path, workdir: Path) -> None:
        """No store: images go as data URIs, and run.log says once why a store is safer."""
        sim = VirtualSim(env={"BATCHKLING_TEST_KEY": TEST_KEY})
        folder, jobs = self._images(tmp_path)
        manifest = write_manifest(folder, jobs, base_url=sim.base_url)
        assert (await sim.run(manifest, workdir)).exit_code == 0
        assert sim.stats()["image_forms"] == {"data_uri": 4}
        log = (workdir / "test-run" / "run.log").read_text()
        assert log.count("run.images_as_data_uri") == 1 and "output.store" in log

    async def test_inputs_upload_needs_a_store(self, tmp_path: Path, workdir: Path) -> None:
        """inputs.upload: true without output.store is a configuration error before creates."""
        from batchkling.errors import ConfigError, unwrapped_groups

        sim = VirtualSim(env={"BATCHKLING_TEST_KEY": TEST_KEY})
        manifest = sim.manifest(tmp_path, 1, inputs={"upload": True})
        with pytest.raises(ConfigError, match=r"inputs\.upload needs output\.store"), \
                unwrapped_groups():
            await sim.run(manifest, workdir)
        assert sim.stats()["create_requests"] == 0


class TestReportLinks:
    async def test_report_signs_links_or_says_why_it_cannot(
            self, tmp_path: Path, workdir: Path, s3_bucket: tuple[str, str]) -> None:
        """`batchkling report` with AWS credentials signs a link per stored video and says when
        they expire; without credentials each card names its object instead."""
        from batchkling.outputs.report import write_report
        from batchkling.store.sqlite import SqliteStore

        endpoint, bucket = s3_bucket
        sim = VirtualSim(env=_vsim_env(endpoint, tmp_path))
        manifest = sim.manifest(tmp_path, 2, output={"store": f"s3://{bucket}/r/",
                                                     "link_expiry": "2h"})
        assert (await sim.run(manifest, workdir)).exit_code == 0
        dest = tmp_path / "page.html"
        async with SqliteStore(workdir / "batchkling.db") as store:
            await write_report(store, "test-run", dest, env=_aws(endpoint, tmp_path))
            signed = dest.read_text()
            await write_report(store, "test-run", dest, env={"HOME": str(tmp_path)})
            unsigned = dest.read_text()
        assert signed.count("X-Amz-Signature=") == 2 and "X-Amz-Expires=7200" in signed
        assert "links that expire" in signed and "batchkling report test-run" in signed
        assert "X-Amz-Signature" not in unsigned and "links that expire" not in unsigned
        assert f"in s3://{bucket}/r/test-run/job-000.mp4 (no credentials" in unsigned
