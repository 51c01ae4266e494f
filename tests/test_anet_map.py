import random

import numpy as np
import pytest

from localizers.anet_map import evaluate_detections, parse_tious
from pipeline.annotations import VideoAnnotation
from pipeline.errors import ConfigError


def _gt(spec):
    """{vid: [(label, start, end), ...]} -> {vid: VideoAnnotation}"""
    return {
        vid: VideoAnnotation(vid, "test", 100.0, None, np.array([a[1:] for a in anns], float).reshape(-1, 2),
                             tuple(a[0] for a in anns))
        for vid, anns in spec.items()
    }


def _det(label, score, start, end):
    return {"label": label, "score": score, "segment": [start, end]}


def _ap(result, label):
    return result.ap[:, result.classes.index(label)]


def test_duplicate_detection_is_a_false_positive_after_the_match():
    gt = _gt({"v": [("A", 0, 10)]})
    r = evaluate_detections(gt, {"v": [_det("A", 0.9, 0, 10), _det("A", 0.8, 0, 10)]}, tious=[0.5])
    assert _ap(r, "A") == pytest.approx([1.0])  # precision 1 at recall 1, then precision 0.5 at recall 1
    r = evaluate_detections(gt, {"v": [_det("A", 0.9, 20, 30), _det("A", 0.8, 0, 10)]}, tious=[0.5])
    assert _ap(r, "A") == pytest.approx([0.5])  # recall 0 -> 1 at precision 1/2


def test_partial_overlap_counts_only_up_to_its_tiou():
    gt = _gt({"v": [("A", 0, 10), ("A", 20, 30)]})
    r = evaluate_detections(gt, {"v": [_det("A", 0.9, 0, 6), _det("A", 0.5, 20, 30)]}, tious="0.5:0.7:0.1")
    # tIoU 0.6 for the first: TP at 0.5 and 0.6 (AP 1), FP at 0.7 (precision 1/2 at recall 1/2: AP 0.25)
    assert _ap(r, "A") == pytest.approx([1.0, 1.0, 0.25])
    assert r.mAP == pytest.approx([1.0, 1.0, 0.25]) and r.average_mAP == pytest.approx(0.75)


def test_class_without_predictions_scores_zero_and_counts_in_the_mean():
    gt = _gt({"v": [("A", 0, 10), ("B", 20, 30)], "w": []})
    r = evaluate_detections(gt, {"v": [_det("A", 0.9, 0, 10)], "w": [_det("A", 0.99, 0, 10)]}, tious=[0.5])
    # the detection on w (no ground truth there) is a false positive ranked first
    assert r.classes == ("A", "B")
    assert _ap(r, "A") == pytest.approx([0.5]) and _ap(r, "B") == pytest.approx([0.0])
    assert r.mAP == pytest.approx([0.25])
    precision, recall = r.pr_curves()["A"]
    assert precision.tolist() == [[0.0, 0.5]] and recall.tolist() == [[0.0, 1.0]]
    assert r.pr_curves()["B"][0].shape == (1, 0)


def test_score_ties_break_as_the_official_reversed_argsort():
    gt = _gt({"v": [("A", 0, 10)]})
    dets = {"v": [_det("A", 0.5, 0, 10), _det("A", 0.5, 40, 50)]}
    tp_first = np.argsort(np.array([0.5, 0.5]))[::-1][0] == 0
    assert _ap(evaluate_detections(gt, dets, tious=[0.5]), "A") == pytest.approx([1.0 if tp_first else 0.5])


def test_tiou_ties_break_as_the_official_reversed_argsort():
    # the first detection overlaps both ground truths by exactly 0.5; which one it takes decides the second
    gt = _gt({"v": [("A", 0, 5), ("A", 5, 10)]})
    dets = {"v": [_det("A", 0.9, 0, 10), _det("A", 0.8, 0, 5)]}
    takes_second = np.argsort(np.array([0.5, 0.5]))[::-1][0] == 1
    expected = 1.0 if takes_second else 0.5
    assert _ap(evaluate_detections(gt, dets, tious=[0.5]), "A") == pytest.approx([expected])


def test_zero_length_segments_follow_the_official_nan_semantics():
    # two empty segments give tIoU 0/0 = nan, which the official evaluator matches at every threshold
    gt = _gt({"v": [("A", 5, 5), ("B", 0, 10)]})
    dets = {"v": [_det("A", 0.9, 7, 7), _det("A", 0.8, 5, 5), _det("B", 0.7, 3, 3)]}
    r = evaluate_detections(gt, dets, tious=[0.3, 0.9])
    assert _ap(r, "A") == pytest.approx([1.0, 1.0])  # first matches, second is a duplicate
    assert _ap(r, "B") == pytest.approx([0.0, 0.0])  # an empty detection inside a real one has tIoU 0


def test_labels_unknown_or_absent_from_the_subset():
    gt = _gt({"v": [("A", 0, 10)], "w": [("B", 0, 10)]})
    # a label that is not a class of the ground truth is counted and reported, not fatal
    r = evaluate_detections(gt, {"v": [_det("C", 0.9, 0, 10), _det("A", 0.8, 0, 10), _det("C", 0.7, 0, 1)]})
    assert r.unknown_labels == {"C": 2} and _ap(r, "A") == pytest.approx([1.0] * 5)
    assert any("2 detections with 1 labels that are not classes" in n for n in r.notes())
    only_v = {"v": gt["v"]}
    assert evaluate_detections(only_v, {"v": [_det("B", 0.9, 0, 10)]}).unknown_labels == {"B": 1}
    with pytest.raises(ConfigError, match="video v: invalid detection"):
        evaluate_detections(gt, {"v": [_det("A", 0.9, 10, 0)]})
    with pytest.raises(ConfigError, match="video v: score and segment must be numbers"):
        evaluate_detections(gt, {"v": [_det("A", "high", 0, 10)]})


def test_parse_tious_gives_the_official_linspace_values():
    assert parse_tious("0.3:0.7:0.1") == tuple(np.linspace(0.3, 0.7, 5))
    assert parse_tious("0.5:0.95:0.05") == tuple(np.linspace(0.5, 0.95, 10))
    assert parse_tious("0.5,0.75") == (0.5, 0.75)
    with pytest.raises(ConfigError):
        parse_tious("0.5:0.3:0.1")


def _official(gt_rows, pred_rows, tious):
    """The official protocol written plainly: class by class, prediction by prediction.
    gt_rows: [(video, label, start, end)] in file order; pred_rows: [(video, label, score, start, end)]."""
    classes = []
    for _, label, _, _ in gt_rows:
        if label not in classes:
            classes.append(label)
    ap = np.zeros((len(tious), len(classes)))
    for c, label in enumerate(classes):
        gts = [(v, s, e) for v, lab, s, e in gt_rows if lab == label]
        preds = [(v, sc, s, e) for v, lab, sc, s, e in pred_rows if lab == label]
        if not preds:
            continue
        order = np.argsort(np.array([p[1] for p in preds]))[::-1]
        for t, thr in enumerate(tious):
            taken = [False] * len(gts)
            tp = []
            for i in order:
                v, _, ps, pe = preds[i]
                mine = [j for j, g in enumerate(gts) if g[0] == v]
                ious = []
                for j in mine:
                    _, gs, ge = gts[j]
                    inter = max(0.0, min(pe, ge) - max(ps, gs))
                    union = (ge - gs) + (pe - ps) - inter
                    ious.append(inter / union if union != 0 else float("nan"))
                hit = 0
                for k in np.argsort(np.array(ious))[::-1] if ious else []:
                    if ious[k] < thr:
                        break
                    if not taken[mine[k]]:
                        taken[mine[k]] = True
                        hit = 1
                        break
                tp.append(hit)
            n_tp, points = 0, []
            for k, hit in enumerate(tp, 1):
                n_tp += hit
                points.append((n_tp / k, n_tp / len(gts)))
            prec = [0.0] + [p for p, _ in points] + [0.0]
            rec = [0.0] + [r for _, r in points] + [1.0]
            for k in range(len(prec) - 2, -1, -1):
                prec[k] = max(prec[k], prec[k + 1])
            ap[t, c] = sum((rec[k] - rec[k - 1]) * prec[k] for k in range(1, len(rec)) if rec[k] != rec[k - 1])
    return classes, ap


@pytest.mark.parametrize("seed", range(12))
def test_matches_a_plain_official_implementation_on_random_detections(seed):
    rng = random.Random(seed)
    coarse = seed % 2 == 0  # coarse values make score and tIoU ties frequent
    gt_rows, pred_rows = [], []
    videos = [f"v{i}" for i in range(rng.randrange(1, 12))]
    for v in videos:
        for _ in range(rng.randrange(0, 6)):
            s = float(rng.randrange(0, 50)) if coarse else rng.uniform(0, 50)
            e = s + (float(rng.randrange(0, 8)) if coarse else rng.uniform(0, 8))
            gt_rows.append((v, rng.choice("ABCD"), s, e))
    if not gt_rows:
        gt_rows.append((videos[0], "A", 1.0, 4.0))
    for v in videos + ["unseen"]:
        for _ in range(rng.randrange(0, 25)):
            s = float(rng.randrange(0, 50)) if coarse else rng.uniform(0, 50)
            e = s + (float(rng.randrange(0, 8)) if coarse else rng.uniform(0, 8))
            score = rng.choice([0.1, 0.5, 0.9]) if coarse else rng.random()
            pred_rows.append((v, rng.choice(sorted({r[1] for r in gt_rows})), score, s, e))
    tious = tuple(np.linspace(0.3, 0.7, 5)) if seed % 3 else tuple(np.linspace(0.5, 0.95, 10))

    gt = {
        v: VideoAnnotation(v, "test", 100.0, None,
                           np.array([[s, e] for w, _, s, e in gt_rows if w == v], float).reshape(-1, 2),
                           tuple(lab for w, lab, _, _ in gt_rows if w == v))
        for v in videos
    }
    dets = {}
    for v, lab, sc, s, e in pred_rows:
        dets.setdefault(v, []).append(_det(lab, sc, s, e))
    # the official frames list ground truth video by video, in file order
    gt_rows = [(v, lab, s, e) for v in videos for w, lab, s, e in gt_rows if w == v]
    pred_rows = [(v, d["label"], d["score"], *d["segment"]) for v, ds in dets.items() for d in ds]

    classes, expected = _official(gt_rows, pred_rows, tious)
    r = evaluate_detections(gt, dets, tious=tious)
    for c, label in enumerate(classes):
        np.testing.assert_allclose(_ap(r, label), expected[:, c], atol=1e-9)
    np.testing.assert_allclose(r.mAP, expected.mean(axis=1), atol=1e-9)


def test_table_and_json_report_every_class():
    gt = _gt({"v": [("A", 0, 10), ("B", 20, 30)]})
    r = evaluate_detections(gt, {"v": [_det("A", 0.9, 0, 10)]}, tious=[0.5, 0.7])
    table = r.table()
    assert "mAP" in table and "A" in table and "B" in table and " 50.00" in table
    js = r.to_json()
    assert js["average_mAP"] == pytest.approx(0.5)
    assert js["per_class"]["B"] == {"ap": [0.0, 0.0], "average_ap": 0.0, "n_gt": 1, "n_pred": 0}


def test_cli_prints_table_or_json_and_names_bad_files(tmp_path, capsys):
    import json

    from localizers.cli import evaluate

    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"database": {"v": {"subset": "Test", "duration": 50.0, "annotations": [
        {"segment": [0, 10], "label": "A"}, {"segment": [20, 30], "label": "B"}]}}}))
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({"results": {"v": [_det("A", 0.9, 0, 10), _det("B", 0.8, 20, 24)]}}))
    assert evaluate(["--annotations", str(gt), "--detections", str(pred), "--tiou", "0.3,0.5"]) == 0
    assert "mAP       100.00  50.00  75.00" in capsys.readouterr().out  # B has tIoU 0.4
    assert evaluate(["--annotations", str(gt), "--detections", str(pred), "--subset", "test", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["subset"] == "test" and len(out["mAP"]) == 5 and out["per_class"]["A"]["ap"][0] == 1.0

    (tmp_path / "broken.json").write_text('{"results": [')
    with pytest.raises(ConfigError, match="broken.json: not a readable JSON"):
        evaluate(["--annotations", str(gt), "--detections", str(tmp_path / "broken.json")])
    (tmp_path / "wrong.json").write_text('{"database": {}}')
    with pytest.raises(ConfigError, match='wrong.json: expected a submission object'):
        evaluate(["--annotations", str(gt), "--detections", str(tmp_path / "wrong.json")])
    with pytest.raises(ConfigError, match="no video in subset 'validation'"):
        evaluate(["--annotations", str(gt), "--detections", str(pred), "--subset", "validation"])
    with pytest.raises(ConfigError, match="--tiou"):
        evaluate(["--annotations", str(gt), "--detections", str(pred), "--tiou", "x"])


def test_cli_warns_on_partial_detections_and_only_detected_scores_the_covered_videos(tmp_path, capsys):
    """Detections for 1 of 4 ground-truth videos: by default the other 3 count as misses (and a warning
    says so); --only-detected evaluates the covered video alone. The table names the dataset and protocol."""
    import json

    from localizers.cli import evaluate

    gt = tmp_path / "thumos_part.json"
    gt.write_text(json.dumps({"database": {v: {"subset": "Test", "duration": 50.0, "annotations": [
        {"segment": [0, 10], "label": "A"}]} for v in ("v1", "v2", "v3", "v4")}}))
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({"results": {"v1": [_det("A", 0.9, 0, 10), _det("Z", 0.5, 0, 10)]}}))
    assert evaluate(["--annotations", str(gt), "--detections", str(pred)]) == 0
    out, err = capsys.readouterr()
    assert "thumos_part detection mAP (%) (THUMOS14 protocol, tIoU 0.30:0.70) over 1 classes, 4 videos" in out
    assert "mAP        25.00  25.00  25.00  25.00  25.00  25.00" in out
    assert "detections cover 1 of the 4 evaluated videos" in err and "--only-detected" in err
    assert "1 detections with 1 labels that are not classes of the ground truth were ignored: 'Z' (1)" in err
    assert evaluate(["--annotations", str(gt), "--detections", str(pred), "--only-detected", "--json",
                     "--tiou", "0.5:0.95:0.05"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mAP"] == [1.0] * 10 and out["n_videos"] == 1 and out["n_videos_gt"] == 4
    assert out["protocol"].startswith("ActivityNet protocol") and out["unknown_labels"] == {"Z": 1}
