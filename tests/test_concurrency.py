"""Two runs of the same stage key at once: one does the work, the other waits and finds it done."""

from __future__ import annotations

import json
import time


def _wait_for_work(toy, stage: str, n: int) -> None:
    deadline = time.time() + 20
    while len(toy.work(stage)) < n and time.time() < deadline:
        time.sleep(0.02)


def test_two_concurrent_runs_both_succeed_and_work_is_done_once(toy):
    for vid in "defg":
        toy.write(f"videos/{vid}.mp4", vid * 4)
    gate = toy.root / "gate"
    args = ("--json", "run", "total", "--dataset", "toy", "--set", f"upper.gate={gate}")
    first = toy.popen(*args)
    _wait_for_work(toy, "upper", 1)  # the first run holds the upper key's lock now, mid-stage
    second = toy.popen(*args)
    time.sleep(1.0)
    gate.touch()
    outs = [p.communicate(timeout=60) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    assert sorted(toy.work("upper")) == sorted("abcdefg")  # each item once
    assert len(toy.work("total")) == 1
    reports = [{s["name"]: s for s in json.loads(out)["stages"]} for out, _ in outs]
    assert reports[0]["upper"]["status"] == "ran" and reports[1]["upper"]["status"] == "cached"
    assert sorted(r["total"]["status"] for r in reports) == ["cached", "ran"]
    ran = next(r for r in reports if r["total"]["status"] == "ran")
    key_dir = toy.cache / "total" / ran["total"]["key"]
    assert (key_dir / "total.txt").read_text() == str(sum(len(t) for t in ("alpha", "bravo!", "charlie")) + 16)
    status = toy.status()
    assert {s["state"] for s in status.values()} == {"done"}
    assert status["upper"]["items"] == {"total": 7, "done": 7, "todo": 0}


def test_no_wait_fails_clearly_while_the_key_is_held(toy):
    gate = toy.root / "gate"
    first = toy.popen("run", "upper", "--dataset", "toy", "--set", f"upper.gate={gate}")
    _wait_for_work(toy, "upper", 1)
    proc = toy.cli("run", "upper", "--dataset", "toy", "--no-wait", check=2)
    gate.touch()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline: error: stage upper")
    assert "is being run by pid" in lines[0] and "--no-wait" in lines[0]
    assert first.wait(timeout=60) == 0
    assert sorted(toy.work("upper")) == ["a", "b", "c"]
