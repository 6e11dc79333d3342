"""Manifest expansion: a 100,000-job matrix, loaded and planned, against a naive baseline.

Run: ``python tests/bench/bench_expand.py [--rows 1000]``  (rows × 25 × 2 sizes × 2 modes jobs)

The manifest: a ``vars_from`` CSV of ``--rows`` products, each pointing at one of 20 real jpg
images, × a 25-value ``vars`` list × 2 sizes × 2 modes — 100,000 image-to-video jobs by default.
Each figure is measured in a fresh child process (time, and ``resource.getrusage`` max RSS of
that child alone):

* ``load_manifest``  — read, validate, expand, check and hash images (batchkling's path);
* ``plan --json``    — the real command, ``python -m batchkling plan M --json > /dev/null``;
* ``naive baseline`` — the same expansion validating every expanded job with a full pydantic
  model (``JobEntry.model_validate``) before building its JobSpec.

Targets: expansion + ``plan --json`` under 10 s and under 500 MB peak RSS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGES = 20
TAKES = 25


def build(folder: Path, rows: int) -> Path:
    """Write the benchmark manifest, its CSV and 20 images into ``folder``."""
    from PIL import Image

    assets = folder / "assets"
    assets.mkdir()
    for i in range(IMAGES):
        Image.new("RGB", (640, 360), (i * 12, 80, 160)).save(assets / f"img{i}.jpg", "JPEG")
    lines = ["product,name,img"] + [f"p{r},Product {r},img{r % IMAGES}" for r in range(rows)]
    (folder / "products.csv").write_text("\n".join(lines) + "\n")
    manifest = folder / "bench.yaml"
    manifest.write_text(
        "version: 1\nname: bench\nlimits: {max_in_flight: 50}\nmatrices:\n"
        '  - id: "{product}-t{take}-{size:slug}-{mode}"\n'
        '    prompt: "{name}, take {take}, premium commercial"\n'
        '    image: "assets/{img}.jpg"\n'
        f"    vars: {{take: {list(range(TAKES))}}}\n"
        "    vars_from: products.csv\n"
        '    axes: {size: ["16:9", "9:16"], mode: [std, pro]}\n'
    )
    return manifest


def child_load(manifest: str) -> dict[str, float]:
    """In a child: time load_manifest (expansion and checks)."""
    from batchkling.manifest.document import load_manifest

    start = time.perf_counter()
    specs = load_manifest(manifest).specs
    return {"seconds": time.perf_counter() - start, "jobs": len(specs)}


def child_naive(manifest: str) -> dict[str, float]:
    """In a child: expand the same matrix, validating every job with a full pydantic model."""
    import csv

    import yaml

    from batchkling.manifest.document import JobEntry
    from batchkling.manifest.expand import compile_template
    from batchkling.manifest.images import ImageCache
    from batchkling.models import JobSpec

    start = time.perf_counter()
    folder = Path(manifest).parent
    matrix = yaml.safe_load(Path(manifest).read_text())["matrices"][0]
    with open(folder / matrix["vars_from"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    templates = {k: compile_template(matrix[k]) for k in ("id", "prompt", "image")}
    cache, specs = ImageCache(), []
    axes = matrix["axes"]
    for row, take, size, mode in itertools.product(
        rows, matrix["vars"]["take"], axes["size"], axes["mode"]
    ):
        variables = {**row, "take": str(take), "size": size, "mode": mode}
        entry = JobEntry.model_validate(
            {k: t.render(variables) for k, t in templates.items()} | {"size": size, "mode": mode}
        )
        image = (folder / str(entry.image)).resolve()
        check = cache.check(image)
        spec = JobSpec(
            job_id=entry.id, model="kling-v2-6", prompt=entry.prompt or "", duration=5,
            size=size, mode=mode, image=str(image), image_sha256=check.sha256,
            variables=variables, group=matrix["id"],
        )
        specs.append(spec)
    return {"seconds": time.perf_counter() - start, "jobs": len(specs)}


def measure(command: list[str]) -> dict[str, float]:
    """Run ``command`` as this process's only child: wall time and the child's max RSS in MB."""
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr.decode()[-2000:]}")
    # This wrapper has exactly one child, so RUSAGE_CHILDREN is that child alone. ru_maxrss is
    # in kilobytes on Linux. CPU time is reported too: wall time suffers on a shared machine.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "max_rss_mb": usage.ru_maxrss / 1024,
        "stdout_bytes": len(proc.stdout),
    }


def isolated(args: list[str]) -> dict[str, float]:
    """Measure ``args`` through a fresh wrapper process so RSS figures do not mix."""
    wrapper = [sys.executable, __file__, "--measure", "--", *args]
    proc = subprocess.run(wrapper, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Build the manifest, run the three measurements, print the figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--child", choices=["load", "naive"])
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.rest)))
        return
    if args.child:
        fn = child_load if args.child == "load" else child_naive
        print(json.dumps(fn(args.rest[0])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        manifest = str(build(Path(tmp), args.rows))
        jobs = args.rows * TAKES * 4
        print(f"manifest: {jobs:,} jobs ({args.rows} CSV rows × {TAKES} takes × 2 sizes × "
              f"2 modes) over {IMAGES} images")
        rows = [
            ("load_manifest (expand + validate)",
             [sys.executable, __file__, "--child", "load", manifest]),
            ("plan --json (real CLI)",
             [sys.executable, "-m", "batchkling", "plan", manifest, "--json"]),
            ("naive baseline (pydantic per job)",
             [sys.executable, __file__, "--child", "naive", manifest]),
        ]
        for label, command in rows:
            figures = isolated(command)
            print(f"{label:36s} {figures['wall_seconds']:6.2f} s wall  "
                  f"{figures['cpu_seconds']:6.2f} s CPU  {figures['max_rss_mb']:7.1f} MB max RSS")


if __name__ == "__main__":
    main()
