"""Faults through the CLI: odd files, killed drivers, gc beside a run, crash leftovers, untrusted
checkpoints, environment errors, and a seeded subset of the fault campaign (bench/faults.py)."""

from __future__ import annotations

import json
import os

import pytest


def _failures(toy, stage: str, key: str) -> list[dict]:
    path = toy.cache / stage / key / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_odd_files_fail_alone_and_the_dataset_goes_on(toy):
    v = toy.videos
    os.symlink("loop.mp4", v / "loop.mp4")
    os.symlink("missing-target.mp4", v / "dangling.mp4")
    (v / "folder.mp4").mkdir()
    os.mkfifo(v / "pipe.mp4")
    toy.write("videos/a.mkv", "another a")  # two files with one stem: both are named, neither runs
    status = toy.status()
    assert any("symlink loop" in r for r in status["upper"]["reasons"])
    out = toy.run(stage="upper", check=1)
    upper = out["by_stage"]["upper"]
    assert sorted(toy.work("upper")) == ["b", "c"]
    assert upper["items"] == {"total": 8, "done": 2, "skipped": 0, "failed": 6}
    why = {f["id"]: f["message"] for f in _failures(toy, "upper", upper["key"])}
    assert why["loop.mp4"] == "symlink loop"
    assert why["dangling.mp4"].startswith("dangling symlink")
    assert "directory" in why["folder.mp4"] and "FIFO" in why["pipe.mp4"]
    assert "a.mkv and a.mp4" in why["a.mp4"] and why["a.mp4"] == why["a.mkv"]
