"""AVA frame-mAP: the vectorised evaluator (detectors/ava_map.py) against a straightforward one that walks
the protocol row by row, keyframe by keyframe and class by class, as the reference code does.

Data: the head of the real v2.1 validation GT (27,163 rows, 6,470 keyframes) from ../shared, and ~100k
seeded detections around it: each GT box jittered, scored for its true actions and for random others,
plus boxes on keyframes without GT, degenerate boxes and crowded keyframes that hit the top-50 cap.
Scores with 3 decimals (as ACAR-Net writes them, so ties are common) or full precision.
Both evaluators must give identical per-class APs; the script exits 1 otherwise.

    python bench/ava_eval.py [--detections 100000] [--repeat 3] [--decimals 3|none]
"""

from __future__ import annotations

import argparse
import heapq
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detectors.ava_map import (PROTOCOLS, DetectionRows, evaluate_frame_map, read_detections_csv,  # noqa: E402
                               write_detections_csv)
from pipeline.ava import read_boxes, read_exclusions, read_labelmap  # noqa: E402


def ava_dir() -> Path:
    for d in (ROOT.parent / "shared/data/annotations/ava", ROOT.parent.parent / "shared/data/annotations/ava"):
        if d.is_dir():
            return d
    sys.exit("bench/ava_eval.py: ../shared/data/annotations/ava not found")


# ------------------------------------------------------------------------------- the straightforward one

def _iou_matrix(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """det (N, 4), gt (M, 4) as [y1, x1, y2, x2]; float64 intersections as the reference box ops."""
    inter_h = np.maximum(np.zeros((len(det), len(gt))), np.minimum(det[:, None, 2], gt[None, :, 2])
                         - np.maximum(det[:, None, 0], gt[None, :, 0]))
    inter_w = np.maximum(np.zeros((len(det), len(gt))), np.minimum(det[:, None, 3], gt[None, :, 3])
                         - np.maximum(det[:, None, 1], gt[None, :, 1]))
    inter = inter_h * inter_w
    area_d = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
    area_g = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    return inter / (area_d[:, None] + area_g[None, :] - inter)


def _ap(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> float:
    order = np.argsort(scores)[::-1]
    labels = tp[order].astype(int)
    ctp, cfp = np.cumsum(labels), np.cumsum(1 - labels)
    precision = np.concatenate([[0], ctp.astype(float) / (ctp + cfp), [0]])
    recall = np.concatenate([[0], ctp.astype(float) / num_gt, [1]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    steps = [i for i in range(1, len(recall)) if recall[i] != recall[i - 1]]
    return float(np.sum([(recall[i] - recall[i - 1]) * precision[i] for i in steps]))


def loop_frame_map(gt, rows: DetectionRows, labelmap, exclusions, protocol: str) -> dict[int, float]:
    official = protocol == "official"
    whitelist = set(labelmap)
    entries: dict = defaultdict(list)
    for i in range(len(rows)):
        label = int(rows.label[i])
        if label not in whitelist:
            continue
        x1, y1, x2, y2 = (float(v) for v in rows.boxes[i])
        item = (float(rows.score[i]), label, y1, x1, y2, x2)
        heap = entries[rows.frames[rows.frame[i]]]
        if not official or len(heap) < 50:
            (heapq.heappush if official else list.append)(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    dets = {k: sorted(v, key=lambda t: -t[0]) for k, v in entries.items()}
    gt_rows: dict = defaultdict(list)
    num_gt: dict = defaultdict(int)
    for key, kf in gt.items():
        # the reference readers sort a keyframe's GT rows by their 8th column (the person id), decreasing
        people = sorted(zip(kf.person_ids, kf.boxes.tolist(), kf.labels), key=lambda p: -p[0])
        for _, (x1, y1, x2, y2), actions in people:
            for a in actions:
                if a in whitelist:
                    gt_rows[key].append((a, [y1, x1, y2, x2]))
                    if not official or key not in exclusions:
                        num_gt[a] += 1
    keys = [k for k in (dets if official else gt_rows) if k not in exclusions]
    dtype = np.float64 if official else np.float32
    scores: dict = defaultdict(list)
    tps: dict = defaultdict(list)
    for key in keys:
        d = dets.get(key, [])
        if official:
            d = [t for t in d if t[4] > t[2] and t[5] > t[3]]
        for c in (labelmap if official else {t[1] for t in d}):
            dc = [t for t in d if t[1] == c]
            gc = np.array([b for a, b in gt_rows.get(key, []) if a == c], dtype=dtype).reshape(-1, 4)
            tp = np.zeros(len(dc), dtype=bool)
            if len(gc) and dc:
                iou = _iou_matrix(np.array([t[2:] for t in dc], dtype=dtype), gc)
                taken = np.zeros(len(gc), dtype=bool)
                for i in range(len(dc)):
                    j = int(np.argmax(iou[i]))
                    if iou[i, j] >= 0.5 and not taken[j]:
                        tp[i] = taken[j] = True
            scores[c].append(np.array([t[0] for t in dc], dtype=dtype))
            tps[c].append(tp)
    out = {}
    for c in labelmap:
        if num_gt[c] == 0 or (not official and c not in scores):
            out[c] = math.nan
        else:
            out[c] = _ap(np.concatenate(scores[c]) if scores[c] else np.zeros(0), np.concatenate(tps[c])
                         if tps[c] else np.zeros(0, bool), num_gt[c])
    return out


# ------------------------------------------------------------------------------------------------ the data

def make_detections(gt, labelmap, n: int, decimals: int | None, seed: int = 0) -> DetectionRows:
    """~n seeded rows: GT boxes picked at random and jittered, each scored for one true action (0.3-1) and
    4-11 random ones (0-0.6); 5 % of picks add 70 small boxes to their keyframe (over the cap of 50);
    10 % add a box on a keyframe without GT and a zero-width box."""
    rng = np.random.default_rng(seed)
    ids = np.array(sorted(labelmap))
    keys = list(gt)
    people = [(k, box, acts) for k, kf in enumerate(gt.values()) for box, acts in zip(kf.boxes, kf.labels)
              if acts]
    picks = rng.integers(len(people), size=max(1, round(n / 12.2)))  # 12.2 rows per pick on average
    frame_of = np.array([people[i][0] for i in picks])
    box = np.array([people[i][1] for i in picks], dtype=np.float64)
    true = np.array([people[i][2][rng.integers(len(people[i][2]))] for i in picks])
    wh = np.tile(box[:, 2:] - box[:, :2], 2)
    box = box + rng.uniform(-0.15, 0.15, box.shape) * wh
    k = rng.integers(4, 12, size=len(picks))
    parts = [(frame_of, box, true, rng.uniform(0.3, 1.0, len(picks))),
             (np.repeat(frame_of, k), np.repeat(box, k, axis=0), rng.choice(ids, k.sum()),
              rng.uniform(0, 0.6, k.sum()))]
    crowd = frame_of[rng.random(len(picks)) < 0.05]
    xy = rng.uniform(0, 0.8, (len(crowd) * 70, 2))
    parts.append((np.repeat(crowd, 70), np.concatenate([xy, xy + 0.2], axis=1), rng.choice(ids, len(xy)),
                  rng.uniform(0, 0.3, len(xy))))
    odd = frame_of[rng.random(len(picks)) < 0.1]
    parts.append((odd + len(keys), np.tile([0.1, 0.1, 0.5, 0.9], (len(odd), 1)), rng.choice(ids, len(odd)),
                  np.full(len(odd), 0.9)))  # frame ids past the GT ones: keyframes 10,000 s later
    parts.append((odd, np.tile([0.5, 0.1, 0.5, 0.9], (len(odd), 1)), rng.choice(ids, len(odd)),
                  np.full(len(odd), 0.95)))
    frame, boxes, label, score = (np.concatenate(x) for x in zip(*parts))
    order = rng.permutation(len(frame))  # file order: interleaved, as a writer's keyframes are not
    frame, boxes, label, score = frame[order], boxes[order], label[order], score[order]
    if decimals is not None:
        score = np.round(score, decimals)
    seen, first = np.unique(frame, return_index=True)
    by_first = seen[np.argsort(first)]
    rank = np.empty(by_first.max() + 1, dtype=np.int64)
    rank[by_first] = np.arange(len(by_first))
    frames = [keys[f] if f < len(keys) else (keys[f - len(keys)][0], keys[f - len(keys)][1] + 10_000)
              for f in by_first.tolist()]
    return DetectionRows(frames, rank[frame], boxes, label.astype(np.int64), score)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--detections", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decimals", default="3", help="score decimals, or 'none' for full precision")
    args = ap.parse_args(argv)
    d = ava_dir()
    labelmap = read_labelmap(d / "ava_action_list_v2.1_for_activitynet_2018.pbtxt")
    gt = read_boxes(d / "ava_val_v2.1_head27163.csv", set(labelmap))
    excluded = read_exclusions(d / "ava_val_excluded_timestamps_v2.1.csv")
    rng = np.random.default_rng(1)
    excluded |= {list(gt)[i] for i in rng.choice(len(gt), 40, replace=False)}  # the real ones miss the head
    rows = make_detections(gt, labelmap, args.detections, None if args.decimals == "none" else int(args.decimals))
    print(f"GT: {gt.stats.rows} rows, {len(gt)} keyframes; detections: {len(rows)} rows on {len(rows.frames)} "
          f"keyframes; scores: {args.decimals} decimals; {len(excluded)} excluded keyframes")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "detections.csv"
        t = time.perf_counter()
        write_detections_csv(path, rows)
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        read_detections_csv(path)
        t_read = time.perf_counter() - t
    print(f"detections CSV: write {t_write * 1000:.0f} ms, read {t_read * 1000:.0f} ms")
    ok = True
    for protocol in PROTOCOLS:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            ours = evaluate_frame_map(gt, rows, labelmap, excluded, protocol=protocol)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        loop = loop_frame_map(gt, rows, labelmap, excluded, protocol)
        t_loop = time.perf_counter() - t
        same = all((math.isnan(a) and math.isnan(loop[c])) or a == loop[c] for c, a in ours.per_class.items())
        ok &= same
        fast = statistics.median(times)
        print(f"{protocol:>9}: vectorised {fast * 1000:7.1f} ms (median of {args.repeat}), loop "
              f"{t_loop * 1000:8.1f} ms, ratio {t_loop / fast:5.1f}x; mAP {ours.mAP:.6f}; "
              f"per-class APs {'identical' if same else 'DIFFER'}; {ours.counts}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
