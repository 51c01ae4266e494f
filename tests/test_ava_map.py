"""AVA frame-mAP (detectors/ava_map.py): every rule of the official protocol and of mmaction2's variant on
hand-made cases, equality with a straightforward loop on tie-heavy data, the real validation head, the CLI."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from ava_fixtures import LABELMAP_ID, ROOT, csv_rows, needs_real_ava, real, write
from detectors.ava_map import (DetectionRows, evaluate_frame_map, read_detections_csv, voc_ap,
                               write_detections_csv)
from pipeline.ava import KeyframeBoxes, read_boxes, read_labelmap
from pipeline.cli import main
from pipeline.errors import ConfigError

LM = {12: "stand", 79: "talk", 80: "watch"}
LEFT, RIGHT = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]


def gt_of(*frames) -> dict:
    """gt_of(((video, ts), [(box, (labels...)), ...]), ...)"""
    return {key: KeyframeBoxes(np.array([b for b, _ in people], dtype=np.float32).reshape(-1, 4),
                               tuple(tuple(lbl) for _, lbl in people), tuple(range(len(people))))
            for key, people in frames}


def dets(*rows) -> DetectionRows:
    """dets((video, ts, box, label, score), ...) in file order."""
    index: dict = {}
    frame = [index.setdefault((v, t), len(index)) for v, t, *_ in rows]
    return DetectionRows(list(index), np.array(frame, dtype=np.int64),
                         np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 4),
                         np.array([r[3] for r in rows], dtype=np.int64), np.array([r[4] for r in rows], dtype=float))


def ap(result, c):
    return result.per_class[c]


def test_voc_all_point_ap_by_hand():
    # ranks TP, FP, TP over 3 GT: precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3 -> 1/3 * 1 + 1/3 * 2/3
    assert voc_ap(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), 3) == pytest.approx(5 / 9)
    assert voc_ap(np.zeros(0), np.zeros(0, bool), 2) == 0.0
    # the right-to-left running maximum of precision: FP, TP, TP over 2 GT -> 1/2 * 2/3 + 1/2 * 2/3
    assert voc_ap(np.array([0.9, 0.8, 0.7]), np.array([False, True, True]), 2) == pytest.approx(2 / 3)


def test_perfect_detections_and_label_map_whitelist():
    gt = gt_of((("v", 902), [(LEFT, (12, 2)), (RIGHT, (79,))]))
    d = dets(("v", 902, LEFT, 12, 0.9), ("v", 902, RIGHT, 79, 0.8),
             ("v", 902, LEFT, 2, 0.99))  # class 2 is not in the label map: not a false positive of anything
    r = evaluate_frame_map(gt, d, LM)
    assert ap(r, 12) == ap(r, 79) == 1.0 and math.isnan(ap(r, 80)) and r.mAP == 1.0
    assert set(r.per_class) == set(LM) and r.counts["unlisted"] == 1 and r.num_gt == {12: 1, 79: 1, 80: 0}


def test_excluded_keyframes_leave_both_sides():
    gt = gt_of((("v", 902), [(LEFT, (12,))]), (("v", 903), [(LEFT, (12,))]))
    d = dets(("v", 902, LEFT, 12, 0.9), ("v", 903, RIGHT, 12, 0.95), ("v", 904, RIGHT, 12, 0.97))
    official = evaluate_frame_map(gt, d, LM, exclusions={("v", 903), ("v", 904)})
    assert ap(official, 12) == 1.0 and official.num_gt[12] == 1 and official.counts["excluded"] == 2
    # mmaction2 still counts the excluded keyframe's GT: recall stops at 1/2
    mm = evaluate_frame_map(gt, d, LM, exclusions={("v", 903), ("v", 904)}, protocol="mmaction2")
    assert ap(mm, 12) == 0.5 and mm.num_gt[12] == 2


def test_detections_on_keyframes_without_gt_are_false_positives_officially_and_ignored_by_mmaction2():
    gt = gt_of((("v", 902), [(LEFT, (12,))]))
    d = dets(("v", 902, LEFT, 12, 0.9), ("w", 1000, LEFT, 12, 0.95))
    assert ap(evaluate_frame_map(gt, d, LM), 12) == 0.5
    mm = evaluate_frame_map(gt, d, LM, protocol="mmaction2")
    assert ap(mm, 12) == 1.0 and mm.counts["ignored_no_gt_frame"] == 1


def test_the_reference_notes_synthetic_check():
    """ava_heads.md §3: two GT keyframes and one extra detection at 0.95 on a keyframe without GT give
    class AP 0.50 / mAP 0.75 under the official code and 0.833 / 0.917 under mmaction2 1.2.0."""
    gt = gt_of((("v", 902), [(LEFT, (12,)), (RIGHT, (79,))]), (("v", 903), [(LEFT, (12,))]))
    d = dets(("v", 902, LEFT, 12, 0.9), ("v", 902, RIGHT, 12, 0.8), ("v", 903, LEFT, 12, 0.7),
             ("v", 902, RIGHT, 79, 0.6), ("v", 904, LEFT, 12, 0.95))
    official, mm = (evaluate_frame_map(gt, d, LM, protocol=p) for p in ("official", "mmaction2"))
    assert (ap(official, 12), official.mAP) == (pytest.approx(0.5), pytest.approx(0.75))
    assert (ap(mm, 12), mm.mAP) == (pytest.approx(5 / 6), pytest.approx(11 / 12))


def test_top_50_per_keyframe_across_classes():
    gt = gt_of((("v", 902), [(LEFT, (12,))]))
    crowd = [("v", 902, RIGHT, 79, 0.9 - i * 1e-3) for i in range(50)]
    r = evaluate_frame_map(gt, dets(*crowd, ("v", 902, LEFT, 12, 0.5)), LM)
    assert ap(r, 12) == 0.0 and r.counts["capped"] == 1  # the 51st row never entered
    r = evaluate_frame_map(gt, dets(("v", 902, LEFT, 12, 0.5), *crowd), LM)
    assert ap(r, 12) == 0.0  # read first, then evicted: the order of the rows does not save it
    r = evaluate_frame_map(gt, dets(*crowd[:49], ("v", 902, LEFT, 12, 0.5)), LM)
    assert ap(r, 12) == 1.0
    assert ap(evaluate_frame_map(gt, dets(*crowd, ("v", 902, LEFT, 12, 0.5)), LM, protocol="mmaction2"), 12) == 1.0


@pytest.mark.parametrize("tp_label,fp_label,tp_y1,fp_y1,tp_first,kept", [
    # A full heap of equal scores: a later equal score does not get in, an earlier one stays...
    (12, 79, 0.0, 0.0, True, True),
    (12, 79, 0.0, 0.0, False, False),
    # ... and a higher score evicts the smallest (score, action_id, y1, x1, y2, x2) tuple.
    (80, 79, 0.0, 0.0, "evict", True),
    (12, 79, 0.0, 0.0, "evict", False),
    (12, 12, 0.1, 0.0, "evict", True),    # same class: the smaller y1 goes
    (12, 12, 0.0, 0.1, "evict", False),
])
def test_top_50_tie_rule(tp_label, fp_label, tp_y1, fp_y1, tp_first, kept):
    tp_box = [0.0, tp_y1, 0.5, 1.0]
    gt = gt_of((("v", 902), [(tp_box, (tp_label,))]))
    tp = ("v", 902, tp_box, tp_label, 0.5)
    fps = [("v", 902, [0.5 + i * 0.005, fp_y1, 0.9, 0.9], fp_label, 0.5) for i in range(49)]
    if tp_first == "evict":
        rows = [tp, *fps, ("v", 902, RIGHT, 80 if tp_label != 80 else 79, 0.9)]
    elif tp_first:
        rows = [tp, *fps, fps[0]]
    else:
        rows = [*fps, fps[0], tp]
    assert (evaluate_frame_map(gt, dets(*rows), LM).per_class[tp_label] > 0) == kept


def test_degenerate_detection_boxes_are_dropped_after_the_cap_and_nothing_is_clipped():
    gt = gt_of((("v", 902), [([0.0, 0.0, 0.4, 1.0], (12,))]))
    zero_width = ("v", 902, [0.6, 0.1, 0.6, 0.9], 12, 0.9)
    inverted = ("v", 902, [0.6, 0.9, 0.7, 0.1], 12, 0.95)
    tp = ("v", 902, [0.0, 0.0, 0.4, 1.0], 12, 0.5)
    r = evaluate_frame_map(gt, dets(zero_width, inverted, tp), LM)
    assert ap(r, 12) == 1.0 and r.counts["degenerate"] == 2
    crowd = [("v", 902, [0.6, 0.1, 0.6, 0.9], 79, 0.9)] * 50
    assert ap(evaluate_frame_map(gt, dets(*crowd, tp), LM), 12) == 0.0  # they still took the 50 places
    # Reaching outside the image: unclipped IoU 0.4 / 0.9 < 0.5 is a miss (clipped it would be 1).
    outside = ("v", 902, [-0.5, 0.0, 0.4, 1.0], 12, 0.9)
    assert ap(evaluate_frame_map(gt, dets(outside), LM), 12) == 0.0
    # mmaction2 keeps a zero-width box (a false positive) and refuses an inverted one.
    assert ap(evaluate_frame_map(gt, dets(zero_width, tp), LM, protocol="mmaction2"), 12) == 0.5
    with pytest.raises(ConfigError, match="v,0902: inverted box"):
        evaluate_frame_map(gt, dets(inverted, tp), LM, protocol="mmaction2")


def test_greedy_matching_without_fallback_and_first_gt_on_iou_ties():
    g1, g2 = [0.0, 0.0, 0.5, 1.0], [0.125, 0.0, 0.625, 1.0]  # exact binary fractions: IoU ties are ties
    gt = gt_of((("v", 902), [(g1, (12,)), (g2, (12,))]))
    # det2's best GT (g1, IoU .85) is taken by det1; its second best (g2, IoU .71) is not tried.
    r = evaluate_frame_map(gt, dets(("v", 902, g1, 12, 0.9), ("v", 902, [0.04, 0.0, 0.54, 1.0], 12, 0.8)), LM)
    assert ap(r, 12) == 0.5
    # Matching runs in score order, not file order: the better-scored det takes g1 first.
    r = evaluate_frame_map(gt, dets(("v", 902, [0.04, 0.0, 0.54, 1.0], 12, 0.8), ("v", 902, g1, 12, 0.9)), LM)
    assert ap(r, 12) == 0.5
    # Equal IoU with both GT (7/9): argmax takes the first GT in the readers' order, the higher person id
    # first (the 8th column is read as a score and sorted): listed second with id 1, g1 still goes first.
    gt = gt_of((("v", 902), [(g2, (12,)), (g1, (12,))]))
    between = [0.0625, 0.0, 0.5625, 1.0]
    r = evaluate_frame_map(gt, dets(("v", 902, between, 12, 0.9), ("v", 902, g2, 12, 0.8)), LM)
    assert ap(r, 12) == 1.0
    r = evaluate_frame_map(gt, dets(("v", 902, between, 12, 0.9), ("v", 902, g1, 12, 0.8)), LM)
    assert ap(r, 12) == 0.5


def test_nan_classes_and_the_mean():
    gt = gt_of((("v", 902), [(LEFT, (12,)), (RIGHT, (79,))]))
    d = dets(("v", 902, LEFT, 12, 0.9), ("v", 902, RIGHT, 80, 0.9))  # 79 undetected, 80 has no GT
    official = evaluate_frame_map(gt, d, LM)
    assert ap(official, 12) == 1.0 and ap(official, 79) == 0.0 and math.isnan(ap(official, 80))
    assert official.mAP == 0.5
    mm = evaluate_frame_map(gt, d, LM, protocol="mmaction2")  # a class without detections leaves the mean
    assert ap(mm, 12) == 1.0 and math.isnan(ap(mm, 79)) and math.isnan(ap(mm, 80)) and mm.mAP == 1.0
    empty = evaluate_frame_map(gt_of(), dets(), LM)
    assert math.isnan(empty.mAP) and empty.to_json()["mAP"] is None


def test_keyframe_dict_detections_and_the_csv_round_trip(tmp_path):
    gt = gt_of((("v", 902), [(LEFT, (12, 79)), (RIGHT, (80,))]), (("w", 950), [(RIGHT, (79,))]))
    scores = {("v", 902): (np.array([LEFT, RIGHT]), np.array([[0.9, 0.8, 0.1], [0.2, 0.0001, 0.7]])),
              ("w", 950): (np.array([RIGHT]), np.array([[0.3, 0.6, 0.2]]))}
    direct = evaluate_frame_map(gt, scores, LM)
    p = tmp_path / "det.csv"
    assert write_detections_csv(p, scores, LM) == 9
    back = read_detections_csv(p)
    assert p.read_text().splitlines()[0] == "v,0902,0.0,0.0,0.5,1.0,12,0.9"
    assert evaluate_frame_map(gt, back, LM).per_class == direct.per_class
    assert write_detections_csv(p, back, min_score=0.002, decimals=3) == 8
    assert p.read_text().splitlines()[1] == "v,0902,0.0,0.0,0.5,1.0,79,0.800"
    assert read_detections_csv(write(tmp_path, "seven.csv", "v,0902,0,0,1,1,12\n")).score.tolist() == [1.0]


def _bench():
    spec = importlib.util.spec_from_file_location("ava_eval_bench", ROOT / "bench/ava_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_real_ava
@pytest.mark.parametrize("decimals", [2, None])
def test_equal_to_the_straightforward_loop_on_tie_heavy_data(decimals):
    bench = _bench()
    labelmap = read_labelmap(real("ava_action_list_v2.1_for_activitynet_2018.pbtxt"))
    full = read_boxes(real("ava_val_v2.1_head27163.csv"), set(labelmap))
    gt = {k: full[k] for k in list(full)[:400]}
    rows = bench.make_detections(gt, labelmap, 6000, decimals, seed=3)
    excluded = set(list(gt)[::37]) | {rows.frames[5]}
    for protocol in ("official", "mmaction2"):
        ours = evaluate_frame_map(gt, rows, labelmap, excluded, protocol=protocol)
        loop = bench.loop_frame_map(gt, rows, labelmap, excluded, protocol)
        assert ours.counts.get("capped", 1) > 0 and ours.counts.get("degenerate", 1) > 0
        for c, value in ours.per_class.items():
            assert (math.isnan(value) and math.isnan(loop[c])) or value == loop[c], (protocol, c, value, loop[c])


@needs_real_ava
def test_real_validation_head_against_itself_and_perturbed_copies(tmp_path):
    labelmap = read_labelmap(real("ava_action_list_v2.1_for_activitynet_2018.pbtxt"))
    gt = read_boxes(real("ava_val_v2.1_head27163.csv"), set(labelmap))
    rows = read_detections_csv(real("ava_val_v2.1_head27163.csv"))  # person ids as scores: ties everywhere
    for protocol in ("official", "mmaction2"):
        r = evaluate_frame_map(gt, rows, labelmap, protocol=protocol)
        present = {c for c, n in r.num_gt.items() if n}
        assert len(present) == 57 and r.mAP == pytest.approx(1.0, abs=1e-12)  # sums of recall steps: 1 - 1e-16
        assert [r.per_class[c] for c in sorted(present)] == pytest.approx([1.0] * 57, abs=1e-12)
        assert all(math.isnan(r.per_class[c]) for c in set(labelmap) - present)
    # Every third row dropped, all scores equal: precision stays 1 and each AP is the recall kept.
    keep = np.arange(len(rows)) % 3 != 0
    dropped = DetectionRows(rows.frames, rows.frame[keep], rows.boxes[keep], rows.label[keep], np.ones(keep.sum()))
    r = evaluate_frame_map(gt, dropped, labelmap)
    for c, n in r.num_gt.items():
        if n:
            assert r.per_class[c] == pytest.approx(np.sum(dropped.label == c) / n)
    # Jittered boxes: some fall below IoU 0.5, the mAP drops, and more jitter drops it further.
    rng = np.random.default_rng(0)
    maps = []
    wh = np.tile(rows.boxes[:, 2:] - rows.boxes[:, :2], 2)
    for scale in (0.25, 0.4, 0.6):
        jitter = rows.boxes + rng.uniform(-scale, scale, rows.boxes.shape) * wh
        maps.append(evaluate_frame_map(gt, DetectionRows(rows.frames, rows.frame, jitter, rows.label,
                                                         rng.random(len(rows))), labelmap).mAP)
    assert 1.0 > maps[0] > maps[1] > maps[2] > 0.0


def _files(tmp_path):
    labelmap = write(tmp_path, "map.pbtxt", LABELMAP_ID)
    gt = write(tmp_path, "gt.csv", csv_rows([("v", "0902", *LEFT, 12, 0), ("v", "0902", *LEFT, 79, 0),
                                            ("v", "0903", *RIGHT, 80, 1)]))
    det = write(tmp_path, "det.csv", csv_rows([("v", "0902", *LEFT, 12, 0.9), ("v", "0902", *RIGHT, 79, 0.8),
                                             ("v", "0903", *RIGHT, 80, 0.7), ("v", "0904", *RIGHT, 80, 0.95)]))
    excl = write(tmp_path, "excl.csv", "v,0904\n")
    return labelmap, gt, det, excl


def test_cli_table_and_json(tmp_path, capsys):
    labelmap, gt, det, excl = _files(tmp_path)
    base = ["--cache-dir", str(tmp_path / "cache"), "evaluate", "detect", "--annotations", str(gt),
            "--detections", str(det), "--labelmap", str(labelmap)]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "gt.csv: 3 rows, 2 keyframes, 2 boxes" in out and "(official protocol)" in out
    assert "  80  watch (a person)" in out and "mAP (3 classes)" in out
    assert main([*base, "--exclusions", str(excl), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mAP"] == pytest.approx((1.0 + 0.0 + 1.0) / 3) and data["counts"]["excluded"] == 1
    assert [c["ap"] for c in data["per_class"]] == [1.0, 0.0, 1.0]
    assert main([*base, "--protocol", "mmaction2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["protocol"] == "mmaction2" and data["counts"]["ignored_no_gt_frame"] == 1


@pytest.mark.parametrize("change,fragment", [
    (("det.csv", "v,0902,0.0,0.0,0.5,1.0,12,0.9\n", "v,0902,0.0,0.0,0.5,1.0,12\n"), "det.csv:2: expected 7 columns"),
    (("det.csv", "0.7\n", "high\n"), "det.csv:3: score: expected a number, got 'high'"),
    (("gt.csv", "80,1\n", "81,1\n"), "gt.csv:3: action_id: unknown label id 81"),
    (("map.pbtxt", "id: 80", "idx: 80"), "map.pbtxt:9: item without id"),
    (("det.csv", None, None), "det.csv: detections file not found"),
    (None, "--protocol: invalid choice: 'voc'"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, change, fragment):
    labelmap, gt, det, excl = _files(tmp_path)
    argv = ["--cache-dir", str(tmp_path / "cache"), "evaluate", "detect", "--annotations", str(gt),
            "--detections", str(det), "--labelmap", str(labelmap)]
    if change is None:
        argv += ["--protocol", "voc"]
    elif change[1] is None:
        (tmp_path / change[0]).unlink()
    else:
        p = tmp_path / change[0]
        p.write_text(p.read_text().replace(change[1], change[2], 1))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pipeline: error: ") and fragment in err[0], err
