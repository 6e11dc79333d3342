"""Peak memory while a video goes to the object store: ``ObjectStore.upload_file`` on 100 MB.

    python tests/bench/bench_upload.py              # --size-mb 100
    python tests/bench/bench_upload.py --size-mb 500

moto's S3 server runs in a child process (tests/s3server.py); the upload runs in another child,
so the RSS measured is the uploading process's alone. That child imports batchkling, makes a
file of random bytes, does one small upload to warm up (obstore's runtime and connection pool),
reads its baseline ``VmRSS``, then samples ``VmRSS`` every 5 ms while it uploads the file the way
the engine does (``content_type="video/mp4"``, ``expect_sha256``: multipart, parts of 8 MiB, 4
in flight, confirmed by ETag and HEAD), and again while ``find_copy`` checks the object as a
resume after a crash would. Goal: the peak stays under 100 MB above the baseline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from s3server import MotoS3Server, make_bucket  # noqa: E402  (the tests folder, just added)

GOAL_MB = 100

_CHILD = r"""
import asyncio, hashlib, os, sys, tempfile, threading, time
from pathlib import Path
from batchkling.outputs.objectstore import ObjectStore

endpoint, bucket, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
MIB = 1 << 20

def vmrss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

def peak_during(coro):
    base, peak, stop = vmrss(), [0], threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], vmrss())
            time.sleep(0.005)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.monotonic()
    result = asyncio.run(coro)
    seconds = time.monotonic() - started
    stop.set()
    thread.join()
    return base, max(peak[0], vmrss()), seconds, result

env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "HOME": tempfile.gettempdir()}
store = ObjectStore(f"s3://{bucket}/bench/", env=env)
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp, "video.mp4")
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for _ in range(size // MIB):
            block = os.urandom(MIB)
            digest.update(block)
            fh.write(block)
    sha = digest.hexdigest()
    del block

    async def warm():
        await store.put_bytes("warmup", b"x" * 1000)
    asyncio.run(warm())

    async def upload():
        return await store.upload_file("run/job.mp4", path, content_type="video/mp4",
                                       expect_sha256=sha)
    base, peak, secs, stored = peak_during(upload())
    assert stored.sha256 == sha and stored.etag_verified, stored
    print(f"upload {base} {peak} {secs:.2f} {stored.etag}")

    async def check():
        return await store.find_copy("run/job.mp4", path)
    base, peak, secs, found = peak_during(check())
    assert found is not None and found.sha256 == sha
    print(f"find_copy {base} {peak} {secs:.2f} -")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100)
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024
    root = HERE.parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    worst = 0.0
    with MotoS3Server() as server:
        bucket = make_bucket(server.endpoint_url)
        proc = subprocess.run([sys.executable, "-c", _CHILD, server.endpoint_url, bucket,
                               str(size)], env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        print(f"{args.size_mb} MB random file to moto on loopback; RSS of the uploading "
              "process only")
        print(f"  {'step':<10} {'baseline':>9} {'peak':>9} {'above':>8} {'seconds':>8} {'MB/s':>6}")
        for line in proc.stdout.splitlines():
            step, base, peak, secs, _etag = line.split()
            above = (int(peak) - int(base)) / 2**20
            worst = max(worst, above)
            rate = args.size_mb / float(secs) if float(secs) else 0.0
            print(f"  {step:<10} {int(base) / 2**20:>7.1f}MB {int(peak) / 2**20:>7.1f}MB "
                  f"{above:>6.1f}MB {float(secs):>8.2f} {rate:>6.0f}")
    verdict = "under" if worst < GOAL_MB else "OVER"
    print(f"peak above baseline: {worst:.1f} MB ({verdict} the {GOAL_MB} MB goal)")
    return 0 if worst < GOAL_MB else 1


if __name__ == "__main__":
    raise SystemExit(main())
