"""``batchkling plan`` at scale: an explicit 100,000-job list, and a 1,000,000-job matrix as JSON.

Run: ``python tests/bench/bench_plan.py [--explicit 100000] [--matrix 1000]``
(the matrix is ``--matrix`` × ``--matrix`` jobs: two variables of that many values each)

Each figure is the real command in a fresh child process, ``python -m batchkling plan M
[--json] > /dev/null``: its wall time and its peak RSS (``VmHWM``, read by a tiny wrapper that
runs the command in-process, so the figure is the command's own).

Before this change (main at cf6fe78, the same machine): the 100,000-job list 406 MB, the
1,000,000-job matrix with ``--json`` 1,616 MB (issue #19 measured 451 MB and 1.6 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

WRAPPER = r"""
import contextlib, os, sys
from batchkling.cli import main
sys.argv = ["batchkling", *sys.argv[1:]]
with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
    try:
        main()
    except SystemExit as exc:
        code = exc.code
with open("/proc/self/status") as fh:
    peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
print(peak, code, file=sys.stderr)
"""


def run(manifest: Path, *extra: str) -> tuple[float, float]:
    """Seconds and peak MB of ``batchkling plan manifest extra…`` in a child process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, "plan", str(manifest), *extra],
                          capture_output=True, text=True, check=False)
    took = time.perf_counter() - start
    peak_kb, code = proc.stderr.strip().splitlines()[-1].split()
    if code not in ("0", "None"):
        raise SystemExit(f"plan failed ({code}):\n{proc.stderr}")
    return took, int(peak_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--explicit", type=int, default=100_000)
    parser.add_argument("--matrix", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        explicit = folder / "explicit.yaml"
        jobs = [{"id": f"job-{i:06d}", "prompt": f"Product shot {i}, slow orbit, soft key light"}
                for i in range(args.explicit)]
        explicit.write_text(yaml.safe_dump({"version": 1, "name": "explicit", "jobs": jobs},
                                           sort_keys=False))
        matrix = folder / "matrix.yaml"
        values = list(range(args.matrix))
        matrix.write_text(json.dumps({"version": 1, "name": "matrix", "matrices": [{
            "id": "s{a}-{b}", "prompt": "scene {a} variant {b}, cinematic",
            "vars": {"a": values, "b": values}}]}))
        for label, path, extra in (
            (f"explicit {args.explicit:,} jobs, table", explicit, ()),
            (f"explicit {args.explicit:,} jobs, --json", explicit, ("--json",)),
            (f"matrix {args.matrix ** 2:,} jobs, --json", matrix, ("--json",)),
        ):
            took, peak = run(path, *extra)
            print(f"{label:>34}: {took:6.1f} s   peak RSS {peak:6.0f} MB")


if __name__ == "__main__":
    main()
