"""Spotting mAP at time tolerances on hand-made cases whose APs are worked out in the comments."""

import json

import numpy as np
import pytest

from localizers.point_map import evaluate_points, parse_tolerances
from pipeline.annotations import load_temporal
from pipeline.errors import ConfigError


def _gt(tmp_path, videos: dict, subset="test"):
    db = {vid: {"subset": subset, "duration": 60.0,
                "annotations": [{"timestamp": t, "label": c} for c, t in events]}
          for vid, events in videos.items()}
    path = tmp_path / "points.json"
    path.write_text(json.dumps({"database": db}))
    return load_temporal(path)


def _dets(*rows):
    out = {}
    for vid, label, score, t in rows:
        out.setdefault(vid, []).append({"label": label, "score": score, "timestamp": t})
    return out


def test_greedy_by_score_within_each_tolerance(tmp_path):
    gt = _gt(tmp_path, {"v": [("a", 10.0), ("a", 20.0)]})
    dets = _dets(("v", "a", 0.9, 10.5), ("v", "a", 0.8, 16.0), ("v", "a", 0.7, 19.0))
    r = evaluate_points(gt, dets, tolerances=(1, 2, 5))
    # 1 s and 2 s: TP (10), FP (16 is 4 s from 20), TP (20): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.  5 s: TP, TP (16 -> 20), FP (both taken) -> AP = 1.
    assert np.allclose(r.ap[:, 0], [5 / 6, 5 / 6, 1.0])
    assert np.allclose(r.mAP, [5 / 6, 5 / 6, 1.0]) and r.average_mAP == pytest.approx((5 / 6 * 2 + 1) / 3)
    assert r.n_gt.tolist() == [2] and r.n_pred.tolist() == [3]


def test_a_detection_takes_the_nearest_unmatched_ground_truth(tmp_path):
    gt = _gt(tmp_path, {"v": [("a", 10.0), ("a", 11.5)]})
    # 10.9 is 0.9 s from 10 and 0.6 s from 11.5: it takes 11.5, leaving 10 for 10.2 (both TP, AP 1);
    # taking the first one within 1 s (10) would have left 11.5 out of 10.2's reach (AP 1/2)
    r = evaluate_points(gt, _dets(("v", "a", 0.9, 10.9), ("v", "a", 0.8, 10.2)), tolerances=(1,))
    assert r.ap[0, 0] == pytest.approx(1.0)


def test_classes_videos_unknown_labels_and_missing_classes(tmp_path):
    gt = _gt(tmp_path, {"v1": [("a", 5.0)], "v2": [("a", 5.0), ("b", 8.0), ("c", 30.0)]})
    dets = _dets(("v1", "a", 0.6, 5.2),
                 ("v2", "a", 0.9, 30.0),   # a's best-scored detection is 25 s from v2's a: FP
                 ("v2", "b", 0.5, 8.0),
                 ("v2", "b", 0.4, 30.0),   # c's time, b's label: no match (FP after b's TP)
                 ("v2", "zzz", 0.99, 5.0))  # not a class: ignored, counted
    r = evaluate_points(gt, dets, tolerances=(2,))
    # a: FP then TP: precision 0, 1/2 at recall 0, 1/2 -> AP = 1/2 * 1/2 = 1/4; b: TP, FP -> 1; c: none -> 0
    assert r.classes == ("a", "b", "c")
    assert np.allclose(r.ap[0], [0.25, 1.0, 0.0]) and r.mAP[0] == pytest.approx(1.25 / 3)
    assert r.unknown_labels == {"zzz": 1} and "not classes of the ground truth" in r.notes()[0]
    assert r.n_pred.tolist() == [2, 2, 0]


def test_only_videos_and_subset_restrict_both_sides(tmp_path):
    gt = _gt(tmp_path, {"v1": [("a", 5.0)], "v2": [("a", 5.0)]})
    dets = _dets(("v1", "a", 0.9, 5.0), ("v2", "a", 0.8, 50.0))
    assert evaluate_points(gt, dets, tolerances=(1,)).ap[0, 0] == pytest.approx(0.5)
    only = evaluate_points(gt, dets, tolerances=(1,), only_videos={"v1"})
    assert only.ap[0, 0] == 1.0 and only.n_videos == 1 and "evaluated 1 of the 2" in only.notes()[0]
    assert evaluate_points(gt, dets, subset="train", tolerances=(1,)).classes == ()


def test_table_and_json_name_the_tolerances(tmp_path):
    gt = _gt(tmp_path, {"v": [("a", 10.0)]})
    r = evaluate_points(gt, _dets(("v", "a", 0.9, 10.0)), tolerances="1,2,5", dataset="demo_points")
    head = r.table().splitlines()[:3]
    assert head[0].startswith("demo_points spotting mAP (%) (point events, tolerance 1, 2, 5 s)")
    assert head[1].split() == ["tolerance", "1s", "2s", "5s", "avg"]
    assert r.to_json()["tolerances"] == [1.0, 2.0, 5.0] and "tious" not in r.to_json()


def test_bad_input_is_one_line(tmp_path):
    gt = _gt(tmp_path, {"v": [("a", 10.0)]})
    with pytest.raises(ConfigError, match="video v: detection 0: expected"):
        evaluate_points(gt, {"v": [{"label": "a", "score": 1, "segment": [1, 2]}]})
    with pytest.raises(ConfigError, match="tolerances must be seconds > 0"):
        parse_tolerances("1,0")
    seg = tmp_path / "seg.json"
    seg.write_text(json.dumps({"database": {"v": {"subset": "t", "duration": 9,
                                                  "annotations": [{"segment": [1, 2], "label": "a"}]}}}))
    with pytest.raises(ConfigError, match="not point events"):
        evaluate_points(load_temporal(seg), {})
