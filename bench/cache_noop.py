"""No-op rerun and ``pipeline status`` over 1,000 cached items, against the first run.

A two-stage graph (a per-item stage over 1,000 small files that copies each one, and a whole stage
that reads their records) runs through the real CLI in fresh processes. Targets: the no-op rerun
under 1 s wall and under 5 % of the first run.

    python bench/cache_noop.py [--items 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = """\
stages:
  copy:
    entry: benchstages:copy
    per_item: true
    version: 1
    params: {suffix: ".out"}
  count:
    entry: benchstages:count
    needs: [copy]
    params: {}
"""

MODULE = '''\
def copy(ctx):
    data = ctx.out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    for item in ctx.progress(ctx.items, total=len(ctx.items)):
        body = item.path.read_bytes()
        (data / (item.id + ctx.params["suffix"])).write_bytes(body)
        ctx.item_done(item, {"bytes": len(body)})
    return {"summary": f"copied {len(ctx.items)} files"}


def count(ctx):
    n = len(list((ctx.upstream["copy"] / "items").glob("*.json")))
    return {"summary": f"{n} records"}
'''


def timed(argv: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one command. CPU time is reported too because wall
    time on a shared machine mostly measures the other processes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_of(n: int, argv: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    runs = [timed(argv, cwd, env) for _ in range(n)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3, help="no-op / status runs (median reported)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cache_noop_") as tmp:
        root = Path(tmp)
        (root / "stages.yaml").write_text(STAGES)
        (root / "benchstages.py").write_text(MODULE)
        (root / "videos").mkdir()
        for i in range(a.items):
            (root / "videos" / f"video_{i:05d}.mp4").write_bytes(os.urandom(2048))
        (root / "bench.yaml").write_text("name: bench\ntask: localize\nvideos: videos\n")
        env = dict(os.environ, PIPELINE_NO_PROGRESS="1")
        base = [sys.executable, "-m", "pipeline.cli", "--stages", str(root / "stages.yaml"),
                "--cache-dir", str(root / "cache")]
        run = base + ["run", "count", "--dataset", str(root / "bench.yaml")]
        status = base + ["status", "--dataset", str(root / "bench.yaml")]
        first = timed(run, root, env)
        noop = median_of(a.repeat, run, root, env)
        stat = median_of(a.repeat, status, root, env)
        startup = median_of(a.repeat, [sys.executable, "-c", "import pipeline.cli"], root, env)
    print(f"items {a.items}; median of {a.repeat} runs; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':20} {'wall s':>8} {'cpu s':>8} {'wall/first':>11} {'cpu/first':>10}")
    for name, (wall, cpu) in (("first run", first), ("no-op rerun", noop), ("pipeline status", stat),
                              ("python + import cli", startup)):
        print(f"{name:20} {wall:8.3f} {cpu:8.3f} {wall / first[0]:11.1%} {cpu / first[1]:10.1%}")
    ok = noop[0] < 1.0 and noop[0] / first[0] < 0.05
    print(f"target (no-op rerun < 1 s wall and < 5 % of the first run): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
