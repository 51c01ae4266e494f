"""Shared fixtures. ``toy``: a toy project in tmp with a two-stage graph driven through the real CLI.

Stage ``upper`` maps over the dataset's "videos" (small text files named *.mp4) and writes one
upper-cased copy per item; stage ``total`` reads upper's item records and writes their sum. Every
unit of work appends a line to ``counts/<stage>.log``, so tests assert on work done, not on time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOY_STAGES = """\
stages:
  upper:
    entry: toyupper:upper
    per_item: true
    version: 1
    code: [toyupper]
    file_params: [weights]
    params: {repeat: 1, weights: null}
    runtime: {delay: 0.0, fail: "", gate: ""}
  total:
    entry: toytotal.stage:total
    needs: [upper]
    code: [toytotal]
    params: {scale: 1, fmt: {width: 0}}
"""

TOY_UPPER = '''\
import os
import time
from pathlib import Path


def _count(stage, line):
    with open(Path(os.environ["TOY_COUNTS"]) / f"{stage}.log", "a") as f:
        f.write(line + "\\n")


def upper(ctx):
    data = ctx.out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    for item in ctx.progress(ctx.items, total=len(ctx.items)):
        if item.id == ctx.runtime["fail"]:
            ctx.item_failed(item, "unreadable", "toy failure")
            continue
        time.sleep(ctx.runtime["delay"])
        text = item.path.read_text()
        (data / f"{item.id}.txt").write_text(text.upper() * ctx.params["repeat"])
        ctx.item_done(item, {"chars": len(text) * ctx.params["repeat"]})
        _count("upper", item.id)
        while ctx.runtime["gate"] and not os.path.exists(ctx.runtime["gate"]):
            time.sleep(0.01)  # the test holds the stage here, mid-way, until it creates the gate file
    return {"summary": f"upper-cased {len(ctx.items)} files"}
'''

TOY_TOTAL = '''\
import json

from toyupper import _count
from toytotal.fmt import render


def total(ctx):
    records = sorted((ctx.upstream["upper"] / "items").glob("*.json"))
    value = sum(json.loads(r.read_text())["chars"] for r in records) * ctx.params["scale"]
    (ctx.out_dir / "total.txt").write_text(render(value, ctx.params["fmt"]["width"]))
    _count("total", str(value))
    print(f"total is {value}")  # a chatty stage must not break --json
    return {"summary": f"total = {value}", "value": value}
'''

TOY_FMT = '''\
def render(value, width):
    return str(value).rjust(width)
'''


class Toy:
    def __init__(self, root: Path):
        self.root = root
        self.videos = root / "videos"
        self.cache = root / "cache"
        self.counts = root / "counts"
        self.manifest = root / "data" / "toy.yaml"
        self.env = dict(os.environ, TOY_COUNTS=str(self.counts), PIPELINE_NO_PROGRESS="1")
        self.env.pop("PIPELINE_CACHE", None)

    def write(self, rel: str, text: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pipeline.cli", "--stages", str(self.root / "stages.yaml"),
                "--cache-dir", str(self.cache), *args]

    def cli(self, *args: str, check: int | None = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*args), cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=60)
        if check is not None:
            assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
        return proc

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), cwd=self.root, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, *args: str, stage: str = "total", check: int | None = 0) -> dict:
        """``pipeline run <stage> --dataset toy --json ...`` -> its JSON object (stages by name)."""
        proc = self.cli("--json", "run", stage, "--dataset", str(self.manifest), *args, check=check)
        out = json.loads(proc.stdout)
        out["by_stage"] = {s["name"]: s for s in out["stages"]}
        return out

    def status(self, *args: str) -> dict:
        proc = self.cli("--json", "status", "--dataset", str(self.manifest), *args)
        (ds,) = json.loads(proc.stdout)["datasets"]
        return {s["stage"]: s for s in ds["stages"]}

    def work(self, stage: str) -> list[str]:
        """Lines of work done by ``stage`` so far (item ids for upper, values for total)."""
        p = self.counts / f"{stage}.log"
        return p.read_text().split() if p.exists() else []


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a loaded machine (no spinning)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def toy(tmp_path: Path) -> Toy:
    t = Toy(tmp_path)
    t.write("stages.yaml", TOY_STAGES)
    t.write("toyupper/__init__.py", TOY_UPPER)
    t.write("toytotal/__init__.py", "")
    t.write("toytotal/stage.py", TOY_TOTAL)
    t.write("toytotal/fmt.py", TOY_FMT)
    t.write("data/toy.yaml", textwrap.dedent("""\
        name: toy
        task: localize
        videos: ../videos
    """))
    t.counts.mkdir()
    for vid, text in {"a": "alpha", "b": "bravo!", "c": "charlie"}.items():
        t.write(f"videos/{vid}.mp4", text)
    t.write("videos/notes.txt", "not a video: ignored")
    return t
