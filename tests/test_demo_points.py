"""The point-event demo, reduced, end to end through the CLI: the segment demo's videos and extraction
(one video set), SnapFormer trained on the actions' onsets, the spotting mAP at time tolerances, and
the evaluate / show / runs outputs naming tolerances instead of tIoUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_demo import MANIFEST, ROOT, _cli, _png_size, _statuses

POINTS = {**MANIFEST, "name": "demo_small_points", "video_set": "demo_small",
          "generate": {**MANIFEST["generate"], "events": "onsets"},
          "params": {**MANIFEST["params"], "localize": {**MANIFEST["params"]["localize"], "model": "snapformer"}}}
# 8 test onsets of 4 classes. This configuration gets mAP 0.73 / 0.77 / 0.77 at 1 / 2 / 5 s (2-core AMD
# EPYC, fp32); the trivial baseline (every class at every second, one score) gets 0.12 / 0.19 / 0.20.
# 0.4 leaves room for another CPU's float differences and still fails a model that does not spot.
MIN_MAP_AT_2S = 0.4


@pytest.fixture(scope="module")
def points(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_points_e2e")
    segments, onsets = root / "demo_small.yaml", root / "demo_small_points.yaml"
    segments.write_text(yaml.safe_dump(MANIFEST))
    onsets.write_text(yaml.safe_dump(POINTS))
    cache = root / "cache"
    extracted = _cli(cache, "run", "extract", "--dataset", str(segments))
    return onsets, cache, extracted, _cli(cache, "run", "all", "--dataset", str(onsets))


def _eval_dir(report: dict) -> Path:
    return next(Path(s["dir"]) for s in report["stages"] if s["name"] == "localize_eval")


def test_shares_the_segment_demos_extraction_and_spots_the_onsets(points):
    _, cache, extracted, first = points
    assert _statuses(first) == {"extract": "cached", "localize": "ran", "localize_eval": "ran"}
    keys = {s["name"]: s["key"] for s in first["stages"]}
    assert keys["extract"] == next(s["key"] for s in extracted["stages"] if s["name"] == "extract")
    generated = [p.name for p in (cache / "datasets").iterdir() if p.is_dir()]
    assert len(generated) == 1 and generated[0].startswith("demo_small-")  # one set of videos
    metrics = json.loads((_eval_dir(first) / "metrics.json").read_text())
    assert metrics["tolerances"] == [1.0, 2.0, 5.0] and "tious" not in metrics
    assert metrics["mAP"][1] >= MIN_MAP_AT_2S, metrics
    events = json.loads((_eval_dir(first) / "detections.json").read_text())["results"]
    assert set(next(d for v in events.values() for d in v)) == {"label", "score", "timestamp"}


def test_evaluate_runs_and_show_name_the_tolerances(points):
    manifest, cache, _, first = points
    eval_dir = _eval_dir(first)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    out = _cli(cache, "evaluate", "localize", "--annotations", metrics["annotations"], "--detections",
               str(eval_dir / "detections.json"), "--subset", "test", "--tolerance", "2,5")
    assert out["tolerances"] == [2.0, 5.0] and out["mAP"] == metrics["mAP"][1:]
    refused = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", "localize", "--annotations",
                              metrics["annotations"], "--detections", str(eval_dir / "detections.json"),
                              "--tiou", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--tiou: " in refused.stderr and "time tolerances" in refused.stderr
    runs = _cli(cache, "runs")
    row = next(r for r in runs["runs"] if r["key"] == next(s["key"] for s in first["stages"]
                                                             if s["name"] == "localize_eval"))
    assert list(row["mAP"]) == ["@1s", "@2s", "@5s", "avg"]
    timeline, pr = cache.parent / "timeline.png", cache.parent / "pr.png"
    _cli(cache, "show", "localize", "--dataset", str(manifest), "--video", "demo_test_000",
         "--plot", str(timeline), "--plot-pr", str(pr))
    for path in (timeline, pr):
        width, height = _png_size(path)
        assert 600 <= width <= 3000 and 250 <= height <= 2000, (path, width, height)


def test_the_shipped_point_demo_annotates_the_demos_videos():
    demo = yaml.safe_load((ROOT / "data" / "demo.yaml").read_text())
    points = yaml.safe_load((ROOT / "data" / "demo_points.yaml").read_text())
    assert points["video_set"] == demo["name"] and points["params"]["extract"] == demo["params"]["extract"]
    assert points["generate"] == {**demo["generate"], "events": "onsets"}
