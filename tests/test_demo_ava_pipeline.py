"""A reduced demo_ava, end to end through the CLI: generate -> extract_keyframes (tiny SlowFast) -> detect
(RoI head on the cached maps) -> detect_eval (official frame-mAP), then a head parameter changed: only
detect and detect_eval run again, the keyframe store is reused.

Reduced from data/demo_ava.yaml: 6 videos of 10-12 s at 64x64 instead of 18 of 20-30 s at 128x96, and a
few epochs, so the module runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
FULL = yaml.safe_load((ROOT / "data" / "demo_ava.yaml").read_text())
MANIFEST = {
    **FULL,
    "name": "demo_ava_small",
    "generate": {**FULL["generate"], "seed": 2, "train_videos": 4, "val_videos": 2, "duration_s": [10, 12],
                 "width": 64, "height": 64, "actors": [2, 3]},
    "params": {**FULL["params"], "extract_keyframes": {"preset": "demo_ava", "size": [64]},
               "detect": {**FULL["params"]["detect"], "epochs": 4}},
}
STAGES = ["extract_keyframes", "detect", "detect_eval"]


def _cli(cache: Path, *args: str, code: int = 0, timeout: float = 240) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--cache-dir", str(cache), "--json", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == code, proc.stderr[-3000:]
    return json.loads(proc.stdout) if code == 0 else {"stderr": proc.stderr}


def _statuses(report: dict) -> dict:
    return {s["name"]: s["status"] for s in report["stages"]}


def _stage(report: dict, name: str) -> dict:
    return next(s for s in report["stages"] if s["name"] == name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_ava_e2e")
    manifest = root / "demo_ava_small.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    cache = root / "cache"
    return manifest, cache, _cli(cache, "run", "all", "--dataset", str(manifest))


def test_run_all_extracts_trains_and_scores_with_the_official_protocol(demo):
    _, _, first = demo
    assert _statuses(first) == {name: "ran" for name in STAGES}
    items = _stage(first, "extract_keyframes")["items"]
    assert items["failed"] == 0 and items["done"] == items["total"] > 20
    evaluation = _stage(first, "detect_eval")
    assert evaluation["summary"].startswith("AVA frame-mAP@0.5 (official protocol)")
    out = Path(evaluation["dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["id"] for c in metrics["per_class"]] == [1, 4, 33, 45, 52, 61, 73]
    assert 0 < metrics["mAP"] <= 1 and metrics["boxes"] == "proposals"
    with open(out / "detections.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows and all(len(r) == 8 for r in rows)
    assert {int(r[6]) for r in rows} == {1, 4, 33, 45, 52, 61, 73}
    assert min(int(r[1]) for r in rows) >= 902  # AVA timestamps, offset by 900 s
    train = json.loads((Path(_stage(first, "detect")["dir"]) / "config.json").read_text())
    assert train["feature_dim"] == 576 and train["config"]["epochs"] == 4


def test_a_second_run_does_nothing(demo):
    manifest, cache, _ = demo
    second = _cli(cache, "run", "all", "--dataset", str(manifest))
    assert _statuses(second) == {name: "cached" for name in STAGES}


def test_a_head_parameter_retrains_on_the_cached_store_only(demo):
    manifest, cache, first = demo
    change = ["--set", "detect.head_kwargs.dropout=0.3"]
    status = _cli(cache, "status", "--dataset", str(manifest), *change)
    states = {s["stage"]: s["state"] for s in status["datasets"][0]["stages"]}
    assert states["extract_keyframes"] == "done" and states["detect"] != "done"
    again = _cli(cache, "run", "eval", "--stage", "detect", "--dataset", str(manifest), *change)
    assert _statuses(again) == {"extract_keyframes": "cached", "detect": "ran", "detect_eval": "ran"}
    assert _stage(again, "extract_keyframes")["key"] == _stage(first, "extract_keyframes")["key"]
    assert _stage(again, "detect")["key"] != _stage(first, "detect")["key"]


def test_runs_lists_each_head_experiment_with_params_time_and_per_class_ap(demo):
    manifest, cache, _ = demo
    _cli(cache, "run", "all", "--dataset", str(manifest), "--name", "acar", "--set", "detect.head=acar",
         "--set", "detect.epochs=1")
    runs = _cli(cache, "runs", "--dataset", "demo_ava_small")["runs"]
    acar = next(r for r in runs if r["name"] == "acar")
    assert acar["stage"] == "detect_eval" and acar["differs"] == ["detect.epochs=1", "detect.head='acar'"]
    assert acar["training"]["parameters"] > 100_000 and acar["training"]["seconds_per_epoch"] > 0
    # the classes with ground truth in the small val split
    assert {"stand", "walk"} <= set(acar["per_class"]) <= {"stand", "walk", "wave", "touch", "carry", "approach",
                                                         "near_person"}
    assert all(0 <= ap <= 100 for ap in acar["per_class"].values())
    baseline = next(r for r in runs if r["differs"] == [])
    assert baseline["training"]["parameters"] < acar["training"]["parameters"]


def test_bad_detect_params_fail_in_one_line_before_any_work(demo):
    manifest, cache, _ = demo
    for setting, message in (("detect.loss=softmax", "detect.loss=softmax: expected bce | pose_softmax | focal or null"),
                             ("detect.head=resnet", "detect.head=resnet: expected roi_linear | acrn | acar | cycleacr"),
                             ("detect.head_kwargs.widht=3", "detect.head_kwargs.widht: not a parameter of head")):
        err = _cli(cache, "run", "train", "--stage", "detect", "--dataset", str(manifest), "--set", setting,
                   code=2)["stderr"].strip().splitlines()
        assert len(err) == 1 and message in err[0], err
