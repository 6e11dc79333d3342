"""Big legitimate inputs stay readable under the input limits of issue #14.

Run: ``python tests/bench/bench_limits.py [--manifest-mb 50] [--rows 1000000]``

The limits (a manifest of at most 128 MB, a ``vars_from`` CSV of at most 1 GB and 2,000,000
rows, 2,000,000 jobs per manifest, merges counted toward the node limit) exist to turn a
multi-GB file into a clear problem; they must not turn away the big inputs people use. Each
figure is ``load_manifest`` (read, validate, expand, fingerprint) in a fresh child process:
wall time, CPU time and ``ru_maxrss``:

* ``manifest``: ``--manifest-mb`` MB of explicit jobs, each with a 350-character prompt;
* ``csv``: a matrix over a ``vars_from`` CSV of ``--rows`` rows, one job per row;
* ``merge bomb``: a 1.3 KB manifest whose ``<<`` merges double at each of 40 levels — read in
  milliseconds (before #14: exponential, past 60 s at 24 levels).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def manifest_of(folder: Path, megabytes: float) -> Path:
    """Explicit jobs until the file holds ``megabytes`` MB."""
    path = folder / "big.yaml"
    prompt = ("Luxury fragrance commercial on a dark marble pedestal, slow push-in, soft rim "
              "light, golden hour reflections, shallow depth of field, premium cinematic pacing, "
              "no text, no watermark, a single bottle centred, mist drifting across the frame, "
              "the label turned towards the camera at the end of the shot, 35 mm lens look.")
    target = int(megabytes * 1024 * 1024)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("version: 1\nname: big\njobs:\n")
        written, i = 0, 0
        while written < target:
            line = f'  - {{id: job-{i:07d}, prompt: "{prompt} Take {i}."}}\n'
            fh.write(line)
            written += len(line)
            i += 1
    return path


def csv_of(folder: Path, rows: int) -> Path:
    """A matrix of one job per row of a ``rows``-row CSV."""
    with open(folder / "rows.csv", "w", encoding="utf-8") as fh:
        fh.write("sku,name\n")
        for r in range(rows):
            fh.write(f"s{r:07d},Product number {r}\n")
    path = folder / "matrix.yaml"
    path.write_text("version: 1\nname: rows\nmatrices:\n"
                    "  - id: '{sku}'\n    prompt: '{name}, premium commercial'\n"
                    "    vars_from: rows.csv\n")
    return path


def bomb_of(folder: Path, levels: int = 40) -> Path:
    lines = ["version: 1", "name: bomb", "x0: &x0 {k0: v, k1: v}"]
    lines += [f"x{i}: &x{i} {{<<: [*x{i - 1}, *x{i - 1}], k{i + 1}: v}}"
              for i in range(1, levels)]
    path = folder / "bomb.yaml"
    path.write_text("\n".join([*lines, "jobs: [{id: a, prompt: hi}]"]) + "\n")
    return path


def child(path: str) -> None:
    """In a child: load the manifest and print what it took as JSON."""
    from batchkling.errors import ManifestError
    from batchkling.manifest.document import load_manifest

    start, cpu = time.perf_counter(), time.process_time()
    try:
        jobs, problem = len(load_manifest(path).expand()), None
    except ManifestError as exc:
        jobs, problem = 0, str(exc.problems[0])[-80:]
    print(json.dumps({"jobs": jobs, "problem": problem, "wall": time.perf_counter() - start,
                      "cpu": time.process_time() - cpu,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(label: str, path: Path, data: Path | None = None) -> None:
    out = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out)
    size = (data or path).stat().st_size / 1024 / 1024
    print(f"| {label} | {size:,.1f} MB | {result['jobs']:,} | {result['wall']:.2f} s | "
          f"{result['cpu']:.2f} s | {result['rss_mb']:,.0f} MB |"
          + (f" refused: {result['problem']}" if result["problem"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest-mb", type=float, default=50.0)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("| input | file | jobs | wall | CPU | peak RSS |\n|---|---|---|---|---|---|")
        measure("merge bomb (40 levels)", bomb_of(folder))
        measure(f"manifest of explicit jobs ({args.manifest_mb:g} MB)",
                manifest_of(folder, args.manifest_mb))
        measure(f"vars_from CSV of {args.rows:,} rows", csv_of(folder, args.rows),
                folder / "rows.csv")


if __name__ == "__main__":
    main()
