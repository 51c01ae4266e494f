"""``pipeline run extract`` of one generated dataset through 1 and 2 local processes and 2-worker
local Dask and Ray clusters: the stage's wall time, its ratio to one process, the engines' start-up
and the overhead per video, and whether each store is bitwise the one-process store.

Every configuration runs through the real CLI in a fresh process, on one cache (the dataset is
generated once; ``--force`` reruns the stage), after a first unmeasured run. The stage's own
``seconds`` (from ``--json``) includes starting and stopping the cluster; start-up alone is measured
by one trivial task through ``pipeline.executors.stream``. Overhead per video: the stage's seconds
minus the 2-process local run's and the engine's start-up, over the videos. Store: "bitwise" or the
largest absolute difference from the first run's features (clips batched across videos in another
order round differently, even between two local runs).

    python bench/scale.py [--dataset demo] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = (("local", 1), ("local", 2), ("dask", 2), ("ray", 2))


def env() -> dict:
    # Ray workers and Dask's spawned ones import this checkout, not an installed copy.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PIPELINE_NO_PROGRESS": "1", "RAY_AUTH_MODE": "disabled"}


def extract(cache: Path, dataset: str, backend: str, workers: int) -> dict:
    argv = [sys.executable, "-m", "pipeline", "--cache-dir", str(cache), "--json", "run", "extract",
            "--dataset", dataset, "--backend", backend, "--workers", str(workers), "--force"]
    proc = subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv[3:])}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    stage = json.loads(proc.stdout)["stages"][0]
    assert stage["items"]["failed"] == 0, stage
    return stage


def startup(backend: str) -> float:
    # A Python function: Ray's remote() takes no builtin.
    code = ("import time\nfrom pipeline.executors import stream\ndef same(x):\n    return x\n"
            "t = time.perf_counter()\n"
            f"list(stream(same, [1], backend={backend!r}, workers=2))\nprint(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{backend} start-up: exit {out.returncode}\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def largest_difference(a: Path, b: Path) -> float:
    import numpy as np

    from pipeline.store import open_stage_store

    with open_stage_store(a) as x, open_stage_store(b) as y:
        assert x.videos() == y.videos()
        return max(float(np.abs(x.read(v).astype(np.float64) - y.read(v).astype(np.float64)).max())
                   for v in x.videos())


def main() -> None:

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    starts = {b: statistics.median(startup(b) for _ in range(a.repeat)) for b in ("dask", "ray")}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        cache = Path(tmp)
        first = extract(cache, a.dataset, "local", 1)          # generates the dataset; not measured
        videos = first["items"]["total"]
        reference = Path(cache) / "reference"
        shutil.copytree(first["dir"], reference)             # --force rewrites the stage directory
        seconds: dict = {}
        diff: dict = {}
        for _ in range(a.repeat):                             # interleaved: the machine's load drifts
            for backend, workers in CONFIGS:
                stage = extract(cache, a.dataset, backend, workers)
                seconds.setdefault((backend, workers), []).append(stage["seconds"])
                diff[(backend, workers)] = max(diff.get((backend, workers), 0.0),
                                               largest_difference(reference, Path(stage["dir"])))
    base, local2 = (statistics.median(seconds[c]) for c in (("local", 1), ("local", 2)))
    print(f"{a.dataset}: {videos} videos, {os.cpu_count()} CPUs, median of {a.repeat}")
    print(f"{'back-end':<10} {'workers':>7} {'stage s':>8} {'/ 1 proc':>8} {'start s':>8} {'ovh s/video':>11}  store")
    for backend, workers in CONFIGS:
        s = statistics.median(seconds[(backend, workers)])
        start = starts.get(backend)
        overhead = f"{(s - local2 - start) / videos:11.3f}" if start is not None else f"{'':>11}"
        print(f"{backend:<10} {workers:>7} {s:8.1f} {s / base:8.2f} {start or 0:8.1f} {overhead}  "
              f"{'bitwise' if diff[(backend, workers)] == 0 else f'max |diff| {diff[(backend, workers)]:.2g}'}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"bench wall {time.perf_counter() - t0:.0f} s")
