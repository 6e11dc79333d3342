"""Memory and start-up at 10,000 and 100,000 jobs, through the real CLI.

    python tests/bench/bench_scale.py --jobs 10000                  # one run, RSS over time
    python tests/bench/bench_scale.py --jobs 100000 --jobs 10000    # both, side by side
    python tests/bench/bench_scale.py --resume 100000 --left 300    # resume start-up only

What it measures:

1. ``batchkling run`` of a matrix manifest (a ``vars_from`` CSV of products × takes × two
   sizes × two modes: the way a team writes 100,000 ad variants) against the simulator in
   another process at ×1000 with ``max_in_flight: 200``; the run's peak RSS (``VmHWM``, the
   whole process: start-up, the run, the results CSV and the report at the end), RSS sampled
   every half second (so the peak can be placed: start-up, run, or end-of-run files), wall
   time, creates and duplicates.
2. ``--resume N --left K``: a run of N jobs of which N - K are downloaded (the state database
   and the N - K video files are made directly, as a run killed near its end leaves them),
   then ``batchkling resume``: seconds from the process start to its first create reaching
   the simulator, and the resume's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as be

TAKES = 25
AXES = 4  # two sizes × two modes


def build(folder: Path, jobs: int, base_url: str, *, name: str = "scale",
          slots: int = 200) -> Path:
    """A matrix manifest of ``jobs`` text-to-video jobs (rounded to a multiple of 100)."""
    rows = max(1, jobs // (TAKES * AXES))
    lines = ["product,name"] + [f"p{r},Product {r}" for r in range(rows)]
    (folder / "products.csv").write_text("\n".join(lines) + "\n")
    manifest = folder / f"{name}.yaml"
    manifest.write_text(
        f"version: 1\nname: {name}\n"
        f"provider: {{name: imarouter, base_url: '{base_url}', "
        "api_key_env: BATCHKLING_TEST_KEY}\n"
        f"limits: {{max_in_flight: {slots}, submit_rate: 1000, task_timeout: 3h}}\n"
        "matrices:\n"
        '  - id: "{product}-t{take}-{size:slug}-{mode}"\n'
        '    prompt: "{name}, take {take}, premium commercial"\n'
        f"    vars: {{take: {list(range(TAKES))}}}\n"
        "    vars_from: products.csv\n"
        '    axes: {size: ["16:9", "9:16"], mode: [std, pro]}\n'
    )
    return manifest


# The peak is VmHWM, this process's own: ru_maxrss carries the parent's over fork and exec
# (a 10,000-job run after a 100,000-job one read 181 MB for its own 91 MB).
_WRAPPER = (
    "import sys; from batchkling.cli import main; sys.argv = sys.argv[1:]\n"
    "try:\n    main()\nexcept SystemExit as e:\n"
    "    hwm = next(int(x.split()[1]) for x in open('/proc/self/status') "
    "if x.startswith('VmHWM:'))\n"
    "    print('BENCH', hwm, e.code, file=sys.stderr)"
)


def _cli(args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], Any]:
    out = log.open("w")
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, "batchkling", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=out)
    return proc, out


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def _finish(proc: subprocess.Popen[bytes], out: Any, log: Path) -> tuple[int, float]:
    proc.wait()
    out.close()
    lines = [x for x in log.read_text().splitlines() if x.startswith("BENCH ")]
    if not lines:
        raise RuntimeError(f"the run printed no result: {log.read_text()[-2000:]}")
    _, kb, code = lines[-1].split()
    return int(code) if code != "None" else 0, int(kb) / 1024


def run_scale(jobs: int, seed: int) -> dict[str, Any]:
    """One ``batchkling run`` of ``jobs`` jobs; peak RSS and its trace."""
    sim = be.Simulator(1000.0, seed)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = build(Path(tmp), jobs, sim.url)
            env = {**os.environ, "BATCHKLING_TEST_KEY": be.KEY}
            t0 = time.monotonic()
            proc, out = _cli(["run", str(path), "--workdir", str(Path(tmp) / "jobs"),
                              "--speed", "1000", "--yes"], env, Path(tmp) / "log")
            trace: list[tuple[float, int]] = []
            while proc.poll() is None:
                rss = _rss(proc.pid)
                if rss is not None:
                    trace.append((time.monotonic() - t0, rss))
                time.sleep(0.5)
            code, peak = _finish(proc, out, Path(tmp) / "log")
            wall = time.monotonic() - t0
        stats = sim.get("/_sim/stats")
    finally:
        sim.close()
    created = stats["creates"]
    return {"jobs": created, "exit": code, "peak_mb": peak, "wall_s": wall,
            "duplicates": len(stats["duplicate_keys"]), "trace": trace}


def _phases(trace: list[tuple[float, int]]) -> str:
    if not trace:
        return "-"
    n = len(trace)
    start = max(r for _t, r in trace[: max(1, n // 10)])
    middle = max(r for _t, r in trace[n // 10: max(n // 10 + 1, 9 * n // 10)])
    end = max(r for _t, r in trace[9 * n // 10:])
    return f"first tenth {start} MB, middle {middle} MB, last tenth {end} MB"


def make_done_run(folder: Path, jobs: int, left: int, base_url: str) -> Path:
    """A run of ``jobs`` jobs with all but ``left`` downloaded, as a kill near the end leaves
    it: the state database made by a real ``run`` of nothing (budget 0), then its rows set
    directly; one small video file per downloaded job."""
    manifest = build(folder, jobs, base_url)
    text = manifest.read_text().replace("limits:", "budget: {max_usd: 0}\nlimits:")
    manifest.write_text(text)
    env = {**os.environ, "BATCHKLING_TEST_KEY": be.KEY}
    workdir = folder / "jobs"
    proc, out = _cli(["run", str(manifest), "--workdir", str(workdir), "--yes"], env,
                     folder / "prepare.log")
    _finish(proc, out, folder / "prepare.log")
    videos = workdir / "scale" / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(workdir / "batchkling.db")
    try:
        ids = [r[0] for r in con.execute("SELECT job_id FROM jobs ORDER BY seq")]
        done = ids[: len(ids) - left]
        payload = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 1000
        for job_id in done:
            (videos / f"{job_id}.mp4").write_bytes(payload)
        now = time.time()
        con.executemany(
            "UPDATE jobs SET state = 'downloaded', attempt = 1, task_id = ?, video_path = ?,"
            " video_size = 1014, cost_usd = 0.35, submitted_at = ?, completed_at = ?,"
            " render_seconds = 90, updated_at = ? WHERE run_id = 'scale' AND job_id = ?",
            [(f"task-{i}", str(videos / f"{job_id}.mp4"), now - 100, now - 10, now - 10 + i * 1e-4,
              job_id) for i, job_id in enumerate(done)])
        con.execute("UPDATE runs SET state = 'interrupted'")
        con.execute("UPDATE runs SET config_json = ? WHERE run_id = 'scale'",
                    (json.dumps({**json.loads(con.execute(
                        "SELECT config_json FROM runs").fetchone()[0]),
                        "budget": {"max_usd": None}}),))
        con.commit()
    finally:
        con.close()
    return workdir


def run_resume(jobs: int, left: int, seed: int) -> dict[str, Any]:
    """``batchkling resume`` of a run with ``left`` of ``jobs`` jobs to do."""
    sim = be.Simulator(1000.0, seed)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = make_done_run(Path(tmp), jobs, left, sim.url)
            env = {**os.environ, "BATCHKLING_TEST_KEY": be.KEY}
            started = time.time()
            proc, out = _cli(["resume", "scale", "--workdir", str(workdir), "--speed", "1000"],
                             env, Path(tmp) / "log")
            code, peak = _finish(proc, out, Path(tmp) / "log")
            wall = time.time() - started
            stats = sim.get("/_sim/stats")
            tasks = sim.get("/_sim/tasks")
    finally:
        sim.close()
    # The simulator stamps each task with the wall clock of its create.
    first = min(t["created_wall"] for t in tasks) - started if tasks else None
    return {"jobs": jobs, "left": left, "exit": code, "startup_s": first,
            "peak_mb": peak, "wall_s": wall, "creates": stats["creates"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, action="append")
    parser.add_argument("--resume", type=int, help="jobs in the run to resume")
    parser.add_argument("--left", type=int, default=300)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    if args.resume:
        r = run_resume(args.resume, args.left, args.seed)
        print(f"resume of {r['jobs']} jobs with {r['left']} left: first create after "
              f"{r['startup_s']:.2f} s, peak RSS {r['peak_mb']:.0f} MB, whole resume "
              f"{r['wall_s']:.1f} s, exit {r['exit']}, creates {r['creates']}", flush=True)
    for jobs in args.jobs or ([] if args.resume else [10_000]):
        r = run_scale(jobs, args.seed)
        print(f"{r['jobs']} jobs: peak RSS {r['peak_mb']:.0f} MB ({_phases(r['trace'])}), "
              f"wall {r['wall_s']:.0f} s, exit {r['exit']}, duplicates {r['duplicates']}",
              flush=True)


if __name__ == "__main__":
    main()
