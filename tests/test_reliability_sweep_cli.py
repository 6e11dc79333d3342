"""The adversarial sweep of issue #14 across a process boundary: the CLI in a subprocess (or
Click's runner) against a lost or damaged database, a full disk, a provider that echoes the
key, files too big to hold, ids a filesystem cannot keep apart, and a run refused for its lock.

Numbers (S4, S9, …) are docs/reliability.md's "adversarial sweep"; each test fails on the code
before its fix. Every scenario that runs jobs ends on the shared invariants.
"""

from __future__ import annotations

import resource
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import TEST_KEY, cli_process, finish_process
from hostile_http import HostileServer, Reply, Request, wait_for
from invariants import check_invariants, db_query

from batchkling.cli import cli
from batchkling.simulator import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY
from batchkling.testing import write_manifest

pytestmark = pytest.mark.timeout(120)
SPEED = 300.0
RUN = "sweep"


def _cli(*args: str, env: dict[str, str] | None = None,
         limit_memory: int | None = None) -> subprocess.Popen[bytes]:
    def cap() -> None:
        if limit_memory is not None:  # a MemoryError, not the machine's memory, is the failure
            resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))

    return cli_process(*args, env={"KLING_ACCESS_KEY": DEFAULT_ACCESS_KEY,
                                   "KLING_SECRET_KEY": DEFAULT_SECRET_KEY, **(env or {})},
                       stdout=True, preexec_fn=cap)


_finish = finish_process


def _run(*args: str, **kwargs: Any) -> tuple[int, str, str]:
    return _finish(_cli(*args, **kwargs))


def _manifest(folder: Path, url: str, n: int, *, provider: str = "imarouter",
              **limits: Any) -> Path:
    jobs = [{"id": f"clip-{i:02d}", "prompt": f"shot {i}"} for i in range(n)]
    return write_manifest(folder, jobs, name=RUN, provider=provider, base_url=url,
                          limits={"max_in_flight": 4, "submit_rate": 40, **limits})


def _clean(err: str) -> None:
    """A person's error, not a programmer's."""
    assert "Traceback" not in err and "internal error" not in err and "bug" not in err, err


class TestLostDatabase:
    """S4: the database is deleted; the run folder still holds the paid videos."""

    def test_rerun_refuses_to_pay_again(self, tmp_path: Path, workdir: Path,
                                        simulator: Any) -> None:
        """A re-run over videos no database records exits 2 naming the folder and what to
        do, creating nothing; `--yes` starts the run afresh (and pays again, as asked)."""
        sim = simulator(speed=SPEED)
        manifest = _manifest(tmp_path, sim.base_url, 3)
        code, _out, err = _run("run", str(manifest), "--workdir", str(workdir),
                               "--speed", str(SPEED))
        assert code == 0, err
        for name in ("batchkling.db", "batchkling.db-wal", "batchkling.db-shm"):
            (workdir / name).unlink(missing_ok=True)
        code, _out, err = _run("run", str(manifest), "--workdir", str(workdir),
                               "--speed", str(SPEED))
        assert code == 2, err
        _clean(err)
        assert f"{workdir / RUN / 'videos'} already holds 3 videos" in err
        assert "nothing was submitted" in err and "--yes" in err
        assert sim.stats()["creates"] == 3
        code, _out, err = _run("run", str(manifest), "--workdir", str(workdir),
                               "--speed", str(SPEED), "--yes")
        assert code == 0, err
        stats = sim.stats()
        assert stats["creates"] == 6
        check_invariants(workdir, RUN, stats, jobs=3)


def _damage(db: Path, how: str) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    data = db.read_bytes()
    if how == "truncated":
        db.write_bytes(data[: len(data) // 3])
    elif how == "page":
        db.write_bytes(data[:3 * 1024] + b"\xde\xad" * 512 + data[4 * 1024:])
    elif how == "values":
        con = sqlite3.connect(db)
        with con:
            con.execute("UPDATE jobs SET state = 'shredded' WHERE job_id = 'clip-01'")
        con.close()


class TestDamagedDatabase:
    """S9: a truncated or corrupted state database."""

    @pytest.mark.parametrize("how", ["truncated", "page"])
    def test_every_command_names_the_file_and_the_way_out(self, tmp_path: Path,
                                                           workdir: Path, simulator: Any,
                                                           how: str) -> None:
        """`status`, `status RUN`, `report`, `export` and `resume` on a damaged database
        each exit 3 saying the file is damaged, which file, and how to recover — no
        traceback, no "internal error"."""
        sim = simulator(speed=SPEED)
        manifest = _manifest(tmp_path, sim.base_url, 3)
        code, _out, err = _run("run", str(manifest), "--workdir", str(workdir),
                               "--speed", str(SPEED))
        assert code == 0, err
        db = workdir / "batchkling.db"
        _damage(db, how)
        for args in (["status"], ["status", RUN], ["report", RUN], ["export", RUN],
                     ["resume", RUN, "--speed", str(SPEED)]):
            code, _out, err = _run(*args, "--workdir", str(workdir))
            assert code == 3, (args, err)
            _clean(err)
            assert f"the state database {db} is damaged" in err, (args, err)
            assert "restore it from a backup" in err and ".recover" in err
        assert sim.stats()["creates"] == 3

    def test_a_value_no_version_wrote(self, tmp_path: Path, workdir: Path,
                                      simulator: Any) -> None:
        """A job row whose state was overwritten with garbage: `status` says the file is
        damaged (exit 3) instead of reporting an internal error."""
        sim = simulator(speed=SPEED)
        code, _out, err = _run("run", str(_manifest(tmp_path, sim.base_url, 2)), "--workdir",
                               str(workdir), "--speed", str(SPEED))
        assert code == 0, err
        _damage(workdir / "batchkling.db", "values")
        for args in (["status"], ["status", RUN]):
            code, _out, err = _run(*args, "--workdir", str(workdir))
            assert code == 3, (args, err)
            _clean(err)
            assert "is damaged ('shredded' is not a valid JobState)" in err, err


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 16 MB tmpfs mounted for the test (root only), unmounted after it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a small filesystem here (needs root): {exc}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


def _fill(path: Path) -> int:
    """Write ``path`` until the disk is full; return how many bytes fitted."""
    written = 0
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                written += fh.write(b"\0" * 65536) or 0
        except OSError:
            pass
    return written


class TestDiskFull:
    """S9: the disk fills up mid-run (a real filesystem that runs out of room)."""

    def test_says_so_and_resume_continues(self, tmp_path: Path, small_disk: Path,
                                          simulator: Any) -> None:
        """Disk full while tasks render: the run exits 3 saying the disk is full, where,
        and that `resume` continues — no traceback; once there is room, `resume` finishes
        every job with no key created twice."""
        sim = simulator(speed=100.0)
        workdir = small_disk / "jobs"
        manifest = _manifest(tmp_path, sim.base_url, 12, provider="kling", submit_rate=20)
        proc = _cli("run", str(manifest), "--workdir", str(workdir), "--speed", "100")
        wait_for(lambda: sim.stats()["creates"] >= 4)
        filler = small_disk / "filler"
        _fill(filler)
        code, _out, err = _finish(proc)
        assert code == 3, err
        _clean(err)
        assert "the disk holding" in err and str(workdir) in err and "is full" in err, err
        assert f"`batchkling resume {RUN}` continues" in err, err
        filler.unlink()
        code, _out, err = _run("resume", RUN, "--workdir", str(workdir), "--speed", "100")
        assert code == 0, err
        stats = sim.stats()
        assert stats["creates"] == 12
        checked = check_invariants(workdir, RUN, stats, provider="kling", jobs=12)
        assert checked.statuses == {"succeeded": 12}


ACCESS = "AK-echo-5e1f0c9d2b"
SECRET = "SK-echo-77a1c3e09f4b"


def _pieces(secret: str, width: int = 8) -> set[str]:
    return {secret[i:i + width] for i in range(len(secret) - width + 1)}


def _echoing_gateway(kling: bool) -> Any:
    """A provider that quotes the Authorization header back wherever it can."""
    tasks: dict[str, str] = {}

    def app(request: Request) -> Reply:
        auth = request.headers.get("authorization", "")
        bearer = auth.removeprefix("Bearer ")
        if request.method == "POST":
            case = request.json()["prompt"].split()[-1]
            if case == "json-echo":
                return Reply.json({"code": 1200, "message": f"bad request from {auth}",
                                   "error": {"message": f"bad request from {auth}"}}, 400)
            if case == "html-echo":  # the key straddles the 200-character cut of a snippet
                page = "<html>" + "x" * (190 - len("<html>")) + f" {auth} </html>"
                return Reply(502, page.encode(), {"Content-Type": "text/html"})
            task_id = bearer if case == "id-echo" else f"8{len(tasks):05d}"
            tasks[task_id] = case
            if kling:
                return Reply.json({"code": 0, "message": "SUCCEED",
                                   "data": {"task_id": task_id, "task_status": "submitted"}})
            return Reply.json({"id": task_id, "status": "queued"})
        task_id = request.path.rsplit("/", 1)[-1]
        case = tasks.get(task_id, "fine")
        url = f"http://{request.headers['host']}/files/{task_id}.mp4"
        if request.path.startswith("/files/"):
            return Reply(200, b"\x00\x00\x00\x18ftypisom" + b"\x00" * 2000,
                         {"Content-Type": "video/mp4"})
        if case == "fail-echo":
            reason = f"render refused for {auth}"
            if kling:
                return Reply.json({"code": 0, "data": {"task_id": task_id, "task_status":
                                                       "failed", "task_status_msg": reason}})
            return Reply.json({"id": task_id, "status": "failed",
                               "error": {"message": reason}})
        if kling:
            return Reply.json({"code": 0, "data": {"task_id": task_id, "task_status": "succeed",
                                                   "task_result": {"videos": [{"url": url}]}}})
        return Reply.json({"id": task_id, "status": "completed", "results": [{"url": url}]})

    return app


class TestEchoedKeys:
    """S11: a provider that echoes the key (or Kling's JWT) in errors, and as a task id."""

    @pytest.mark.parametrize("provider", ["imarouter", "kling"])
    def test_no_piece_of_a_credential_is_kept_or_printed(self, tmp_path: Path, workdir: Path,
                                                         provider: str) -> None:
        """After creates answered with the bearer in a JSON message, in an HTML page cut at
        200 characters, as the task id, and a task failing with it as the reason: no file
        under the workdir, no row of the database and nothing printed holds any 8
        characters of the key, of the Kling access or secret key, or of a JWT."""
        kling = provider == "kling"
        cases = ["json-echo", "html-echo", "id-echo", "fail-echo", "fine"]
        with HostileServer(_echoing_gateway(kling)) as server:
            jobs = [{"id": c, "prompt": f"shot {c}"} for c in cases]
            manifest = write_manifest(tmp_path, jobs, name=RUN, provider=provider,
                                      base_url=server.url,
                                      limits={"max_in_flight": 5, "task_timeout": "1m"})
            env = {"KLING_ACCESS_KEY": ACCESS, "KLING_SECRET_KEY": SECRET}
            code, out, err = _run("run", str(manifest), "--workdir", str(workdir),
                                  "--speed", "30", env=env)
            code2, out2, err2 = _run("report", RUN, "--workdir", str(workdir), env=env)
            bearers = {r.headers["authorization"].removeprefix("Bearer ")
                       for r in server.requests if "authorization" in r.headers}
        assert code in (1, 3), err  # failed jobs, and (ImaRouter) an unknown one
        assert code2 == 0, err2
        secrets = [ACCESS, SECRET, *bearers] if kling else [TEST_KEY]
        assert len(bearers) >= 1
        needles = set().union(*(_pieces(s) for s in secrets))
        con = sqlite3.connect(workdir / "batchkling.db")
        dump = "\n".join(con.iterdump())
        con.close()
        texts = {"stdout": out + out2, "stderr": err + err2, "database dump": dump}
        for path in workdir.rglob("*"):
            if path.is_file():
                texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
        leaks = {place: sorted(n for n in needles if n in text)[:3]
                 for place, text in texts.items()}
        assert {place: hits for place, hits in leaks.items() if hits} == {}
        assert "[REDACTED]" in dump
        rows = check_invariants(workdir, RUN, jobs=len(cases)).rows
        # The task id that carries the key is refused: ImaRouter cannot look the create up
        # (`unknown`); Kling finds the task by its external id and adopts it.
        assert rows["id-echo"]["status"] == ("succeeded" if kling else "unknown")
        assert rows["fine"]["status"] == "succeeded"
        assert rows["json-echo"]["status"] == rows["fail-echo"]["status"] == "failed"
        print(f"S11 {provider}: {len(texts)} places searched for {len(needles)} key pieces: "
              "0 hits")


class TestHugeFiles:
    """S13: a multi-GB manifest or vars_from CSV, a matrix of a trillion jobs: exit 2 with a
    clear message, in a process that may not use more than 1.5 GB."""

    @pytest.mark.parametrize("what", ["manifest", "csv", "product"])
    def test_refused_with_a_message(self, tmp_path: Path, what: str) -> None:
        """`plan` refuses each at once with the limit it passed, exit 2, no MemoryError."""
        manifest = tmp_path / "m.yaml"
        header = "version: 1\nname: huge\n"
        if what == "manifest":
            manifest.write_text(header + "jobs: [{id: a, prompt: hi}]\n# ")
            with open(manifest, "r+b") as fh:  # sparse: 3 GB on paper, no disk used
                fh.truncate(3 * 1024**3)
        elif what == "csv":
            manifest.write_text(header + "matrices:\n  - {id: 'j-{n}', prompt: 'p {n}', "
                                "vars_from: rows.csv}\n")
            (tmp_path / "rows.csv").write_text("n\n1\n")
            with open(tmp_path / "rows.csv", "r+b") as fh:
                fh.truncate(3 * 1024**3)
        else:
            values = ", ".join(str(i) for i in range(1000))
            manifest.write_text(header + "matrices:\n  - id: 'j-{a}-{b}-{c}-{d}'\n"
                                "    prompt: 'p {a} {b} {c} {d}'\n    vars:\n"
                                + "".join(f"      {v}: [{values}]\n" for v in "abcd"))
        started = time.monotonic()
        code, _out, err = _run("plan", str(manifest), limit_memory=1536 * 1024**2)
        assert code == 2, err
        _clean(err)
        expected = {"manifest": "larger than 128 MB", "csv": "batchkling reads vars_from",
                    "product": "expands to 1,000,000,000,000 combinations"}[what]
        assert expected in err, err
        assert time.monotonic() - started < 30


class TestIds:
    """S14: ids with control characters, and ids that differ only in case."""

    @pytest.mark.parametrize("run_id", ["night\n", "nightly-{date}\n"])
    def test_control_characters_in_a_run_id(self, tmp_path: Path, workdir: Path,
                                            simulator: Any, run_id: str) -> None:
        """`--run-id` ending in a newline (which `$` in a pattern lets through) is refused
        (exit 2) before anything is created or written."""
        sim = simulator()
        manifest = _manifest(tmp_path, sim.base_url, 1)
        result = CliRunner(env={"BATCHKLING_TEST_KEY": TEST_KEY}).invoke(
            cli, ["run", str(manifest), "--run-id", run_id, "--workdir", str(workdir)])
        assert result.exit_code == 2, result.output
        assert "not a safe folder name" in result.stderr
        assert sim.stats()["create_requests"] == 0
        assert list(workdir.iterdir()) == []

    def test_run_ids_differing_in_case(self, tmp_path: Path, workdir: Path,
                                       simulator: Any) -> None:
        """A second run whose id differs from an existing one only in case is refused: on a
        case-insensitive disk both would share one folder and one video per job."""
        sim = simulator(speed=SPEED)
        manifest = _manifest(tmp_path, sim.base_url, 2)
        runner = CliRunner(env={"BATCHKLING_TEST_KEY": TEST_KEY})
        first = runner.invoke(cli, ["run", str(manifest), "--run-id", "Night", "--workdir",
                                    str(workdir), "--speed", str(SPEED)])
        assert first.exit_code == 0, first.output
        second = runner.invoke(cli, ["run", str(manifest), "--run-id", "night", "--workdir",
                                     str(workdir), "--speed", str(SPEED)])
        assert second.exit_code == 2, second.output
        assert "only in case" in second.stderr
        assert sim.stats()["creates"] == 2
        assert db_query(workdir, "SELECT run_id FROM runs") == [("Night",)]


def _snapshot_of(workdir: Path) -> tuple[Any, ...]:
    rows = db_query(workdir, "SELECT base_url, config_json, manifest_path, manifest_text "
                             "FROM runs WHERE run_id = ?", RUN)
    return rows[0]


class TestStoredSettings:
    """S15, S17: what a run stores must read back, and a refused run stores nothing."""

    @pytest.mark.parametrize("setting", ["output: {max_video_mb: .inf}",
                                         "budget: {max_usd: .inf}",
                                         "pricing: {kling-v2-6: .inf}"])
    def test_infinity_is_refused_before_anything_is_stored(
            self, tmp_path: Path, workdir: Path, simulator: Any, setting: str) -> None:
        """A setting of infinity is a manifest problem (exit 2, nothing created or stored) —
        not a snapshot that `resume` cannot read (JSON has no infinity)."""
        sim = simulator()
        manifest = _manifest(tmp_path, sim.base_url, 1)
        manifest.write_text(manifest.read_text() + setting + "\n")
        result = CliRunner(env={"BATCHKLING_TEST_KEY": TEST_KEY}).invoke(
            cli, ["run", str(manifest), "--workdir", str(workdir)])
        assert result.exit_code == 2, result.output
        assert "finite number" in result.stderr, result.stderr
        assert sim.stats()["create_requests"] == 0
        assert list(workdir.iterdir()) == []

    def test_a_refused_run_changes_nothing(self, tmp_path: Path, workdir: Path,
                                           simulator: Any) -> None:
        """While a run is live, a second `run` of it with another base URL and other limits
        exits 3 — and the live run's stored settings are what they were."""
        sim = simulator(never_finish_rate=1.0)  # the first runner stays busy until killed
        other = simulator()
        manifest = _manifest(tmp_path, sim.base_url, 4)
        first = _cli("run", str(manifest), "--workdir", str(workdir), "--speed", "20")
        try:
            wait_for(lambda: sim.stats()["creates"] > 0)
            before = _snapshot_of(workdir)
            (tmp_path / "b").mkdir()
            edited = _manifest(tmp_path / "b", other.base_url, 4, max_in_flight=9)
            code, _out, err = _run("run", str(edited), "--workdir", str(workdir),
                                   "--speed", "20")
            assert code == 3, err
            assert "is being run by process" in err
            assert _snapshot_of(workdir) == before
        finally:
            first.kill()
            first.wait()
        assert other.stats()["create_requests"] == 0
        assert sim.stats()["duplicate_keys"] == []

