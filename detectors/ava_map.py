"""AVA frame-mAP@0.5, the official protocol (ActivityNet ``get_ava_performance.py`` as ACAR-Net's
``calc_mAP.py`` copies it) and mmaction2 1.x's variant, vectorised over all keyframes and classes.

Official, step by step (shared/reference/ava_heads.md §3 and §7):
1. the label map is a whitelist: rows of other classes are dropped, GT and detections alike;
2. excluded keyframes are dropped from both sides (and from the GT counts);
3. at most 50 detections per keyframe across all classes: rows are pushed in file order onto a min-heap of
   ``(score, action_id, y1, x1, y2, x2)``; once full, a row replaces the minimum only when its score is
   strictly greater; the survivors are stable-sorted by decreasing score (from the heap's array order);
4. detections on keyframes without GT are false positives;
5. detection boxes with x2 <= x1 or y2 <= y1 are dropped (after the cap); nothing is clipped;
6. per keyframe and class, in that order, each detection takes the GT of highest IoU (first on ties); it is
   a true positive iff the IoU >= 0.5 and that GT is still free; no fallback to the second best;
7. per class, detections are concatenated in keyframe order, ranked with ``np.argsort(scores)[::-1]`` (the
   same unstable call, so ties fall as they fall there) and scored with VOC all-point AP; a class without
   GT is NaN, a class with GT and no detection 0; the mAP is the mean over the non-NaN classes.

mmaction2 1.x (``ava_utils.ava_eval``): no cap; only GT keyframes are scored (detections elsewhere are
ignored); boxes and scores in float32; a class without any detection is left out of the mean; GT counts
include the excluded keyframes; an inverted detection box is an error there (its BoxList raises).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from pipeline.ava import CsvTable, KeyframeBoxes, keyframe_id
from pipeline.boxes import box_iou_pairs, valid_boxes
from pipeline.context import write_text_atomic
from pipeline.errors import ConfigError

PROTOCOLS = ("official", "mmaction2")
OFFICIAL_CAP = 50
IOU_THRESHOLD = 0.5

Frame = tuple[str, int]


@dataclass(frozen=True)
class DetectionRows:
    """Detections as the official CSV holds them, one row per (box, action) in file order."""

    frames: list[Frame]  # distinct keyframes, in order of first appearance
    frame: np.ndarray  # (D,) int64 index into ``frames``
    boxes: np.ndarray  # (D, 4) float64 normalised xyxy
    label: np.ndarray  # (D,) int64 action id
    score: np.ndarray  # (D,) float64

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def from_keyframes(cls, detections: Mapping[Frame, tuple], labelmap: Mapping[int, str]) -> "DetectionRows":
        """``{(video, ts): (boxes (N, 4), scores (N, K))}``, K over the label map's ids in order, as rows
        box by box and class by class (the order a writer emits them)."""
        ids = np.array(sorted(labelmap), dtype=np.int64)
        frames, parts = [], []
        for i, (frame, (boxes, scores)) in enumerate(detections.items()):
            boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            scores = np.asarray(scores, dtype=np.float64).reshape(len(boxes), -1)
            if scores.shape[1] != len(ids):
                raise ValueError(f"{frame}: {scores.shape[1]} scores per box for {len(ids)} classes")
            frames.append(frame)
            parts.append((np.full(scores.size, i), np.repeat(boxes, len(ids), axis=0), np.tile(ids, len(boxes)),
                          scores.reshape(-1)))
        if not parts:
            return cls([], np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0))
        f, b, lab, s = (np.concatenate(x) for x in zip(*parts))
        return cls(frames, f.astype(np.int64), b, lab, s)


# ------------------------------------------------------------------------------------------ detections CSV

def write_detections_csv(path: str | Path, detections, labelmap: Mapping[int, str] | None = None,
                         min_score: float = 0.0, decimals: int | None = None) -> int:
    """The official 8-column format ``video_id, timestamp, x1, y1, x2, y2, action_id, score``; rows with a
    score below ``min_score`` are left out (mmaction2 writes from 0.002). ``decimals=None`` writes every
    number exactly (what is read back is what was scored); ACAR-Net writes 3. Returns the rows written."""
    rows = detections if isinstance(detections, DetectionRows) else DetectionRows.from_keyframes(detections, labelmap)
    keep = rows.score >= min_score
    keys = [keyframe_id(v, t) for v, t in rows.frames]
    coords = iter([repr(c) for c in rows.boxes[keep].ravel().tolist()])
    fmt = repr if decimals is None else (lambda x, d=decimals: f"{x:.{d}f}")
    lines = [f"{keys[f]},{x1},{y1},{x2},{y2},{c},{fmt(s)}\n" for f, x1, y1, x2, y2, c, s in
             zip(rows.frame[keep].tolist(), coords, coords, coords, coords, rows.label[keep].tolist(),
                 rows.score[keep].tolist())]
    write_text_atomic(Path(path), "".join(lines))
    return len(lines)


def read_detections_csv(path: str | Path) -> DetectionRows:
    """An official detections file (8 columns; 7 columns score 1.0, as the official reader does)."""
    table = CsvTable(Path(path), "detections", (7, 8), "video_id, timestamp, x1, y1, x2, y2, action_id, score")
    ts = table.numbers(1, "timestamp", integer=True).astype(np.int64).tolist()
    boxes = table.boxes()
    label = table.numbers(6, "action_id", integer=True).astype(np.int64)
    score = table.numbers(7, "score") if table.width == 8 else np.ones(len(table))
    index: dict[Frame, int] = {}
    frame = np.fromiter((index.setdefault(f, len(index)) for f in zip(table.ids, ts)), dtype=np.int64,
                        count=len(table))
    return DetectionRows(list(index), frame, boxes, label, score)


# ---------------------------------------------------------------------------------------------- the metric

@dataclass(frozen=True)
class FrameMapResult:
    protocol: str
    labelmap: dict[int, str]
    per_class: dict[int, float]  # NaN: no GT (official), or left out of the mean (mmaction2: no detection)
    num_gt: dict[int, int]
    num_detections: dict[int, int]  # scored detections per class
    counts: dict[str, int]  # what was dropped on the way, for the log

    @property
    def mAP(self) -> float:
        values = [v for v in self.per_class.values() if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    def to_json(self) -> dict:
        def num(x: float):
            return None if math.isnan(x) else x

        return {"protocol": self.protocol, "mAP": num(self.mAP), "counts": self.counts,
                "per_class": [{"id": c, "name": self.labelmap[c], "ap": num(ap), "num_gt": self.num_gt[c],
                               "num_detections": self.num_detections[c]} for c, ap in self.per_class.items()]}

    def table(self) -> str:
        width = max([len(n) for n in self.labelmap.values()] + [6])
        out = [f"AVA frame-mAP@{IOU_THRESHOLD} ({self.protocol} protocol)",
               f"{'id':>4}  {'action':<{width}}  {'AP':>6}  {'GT':>6}  {'dets':>8}"]
        for c, ap in self.per_class.items():
            shown = "-" if math.isnan(ap) else f"{100 * ap:6.2f}"
            out.append(f"{c:>4}  {self.labelmap[c]:<{width}}  {shown:>6}  {self.num_gt[c]:>6}  "
                       f"{self.num_detections[c]:>8}")
        scored = sum(not math.isnan(v) for v in self.per_class.values())
        mean = "-" if math.isnan(self.mAP) else f"{100 * self.mAP:6.2f}"
        out.append(f"{'':>4}  {'mAP (' + str(scored) + ' classes)':<{width}}  {mean:>6}")
        return "\n".join(out)


def evaluate_frame_map(gt: Mapping[Frame, KeyframeBoxes], detections, labelmap: Mapping[int, str],
                       exclusions=(), protocol: str = "official") -> FrameMapResult:
    """Frame-mAP@0.5 of ``detections`` (``DetectionRows``, or ``{(video, ts): (boxes, scores (N, K))}``)
    against ``gt`` (``pipeline.ava.read_boxes``), over the classes of ``labelmap``."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    official = protocol == "official"
    labelmap = dict(sorted(labelmap.items()))
    class_ids = np.array(list(labelmap), dtype=np.int64)
    rows = detections if isinstance(detections, DetectionRows) else DetectionRows.from_keyframes(detections, labelmap)
    excluded = set(exclusions)
    counts = {"detections": len(rows)}

    # The keyframes both sides know, GT first (mmaction2 scores GT keyframes in GT order).
    index: dict[Frame, int] = {}
    gt_frame, gt_label, gt_box, gt_excl = _gt_instances(gt, labelmap, index, excluded)
    det_frame_ids = np.array([index.setdefault(f, len(index)) for f in rows.frames], dtype=np.int64)
    frame = det_frame_ids[rows.frame]
    gt_frames = np.zeros(len(index), dtype=bool)
    gt_frames[gt_frame[~gt_excl]] = True
    frame_excluded = np.array([f in excluded for f in index], dtype=bool)

    keep = np.isin(rows.label, class_ids)
    counts["unlisted"] = int((~keep).sum())
    excl = keep & frame_excluded[frame]
    counts["excluded"] = int(excl.sum())
    keep &= ~excl
    if not official:
        off_gt = keep & ~gt_frames[frame]
        counts["ignored_no_gt_frame"] = int(off_gt.sum())
        keep &= ~off_gt
    idx = np.flatnonzero(keep)

    if official:
        idx = _official_order(idx, frame, rows, counts)
        valid = valid_boxes(rows.boxes[idx])
        counts["degenerate"] = int((~valid).sum())
        idx = idx[valid]
        boxes, scores = rows.boxes[idx], rows.score[idx]
        # Keyframes in order of first appearance among whitelisted rows, as the official dict fills.
        first = np.full(len(index), len(rows), dtype=np.int64)
        np.minimum.at(first, frame[keep], np.flatnonzero(keep))
        frame_rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    else:
        idx = idx[np.lexsort((idx, -rows.score[idx], frame[idx]))]
        boxes, scores = rows.boxes[idx].astype(np.float32), rows.score[idx].astype(np.float32)
        inverted = (boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])
        if inverted.any():
            v, t = next(f for f, i in index.items() if i == frame[idx[np.argmax(inverted)]])
            raise ConfigError(f"detections: {keyframe_id(v, t)}: inverted box {rows.boxes[idx[np.argmax(inverted)]]}"
                              f" (mmaction2's evaluator refuses it; the official protocol drops it)")
        frame_rank = np.arange(len(index))  # GT frames first, in GT order
        gt_box = gt_box.astype(np.float32)
    det_frame, det_label = frame[idx], rows.label[idx]
    # The official concatenation order: keyframe by keyframe, each in its within-keyframe order.
    order = np.argsort(frame_rank[det_frame], kind="stable")
    det_frame, det_label, boxes, scores = det_frame[order], det_label[order], boxes[order], scores[order]

    gt_use = ~gt_excl if official else np.ones(len(gt_label), dtype=bool)
    tp = _true_positives(det_frame, det_label, boxes, gt_frame[~gt_excl], gt_label[~gt_excl], gt_box[~gt_excl])
    num_gt = {int(c): int(n) for c, n in zip(class_ids, _count(gt_label[gt_use], class_ids))}
    per_class, num_det = {}, {}
    by_class = np.argsort(det_label, kind="stable")
    starts = np.searchsorted(det_label[by_class], class_ids)
    ends = np.searchsorted(det_label[by_class], class_ids, side="right")
    for c, s, e in zip(class_ids.tolist(), starts, ends):
        sel = by_class[s:e]
        num_det[c] = len(sel)
        if num_gt[c] == 0 or (not official and len(sel) == 0):
            per_class[c] = float("nan")
        else:
            per_class[c] = voc_ap(scores[sel], tp[sel], num_gt[c])
    return FrameMapResult(protocol, labelmap, per_class, num_gt, num_det, counts)


def _gt_instances(gt, labelmap, index: dict, excluded: set):
    """One (frame, class, box) per GT box and listed action; frames registered in ``index`` (a keyframe
    without listed actions is no GT keyframe, as the whitelisting reader has it). Within a keyframe the
    GT are in the reference readers' order: the 8th column (the person id) read as a score and sorted
    decreasing, stably; it decides which GT an IoU tie goes to."""
    keys = list(gt)
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0, bool)
    boxes = np.concatenate([kf.boxes for kf in gt.values()]).astype(np.float64)
    box_frame = np.repeat(np.arange(len(keys)), [len(kf.labels) for kf in gt.values()])
    person = np.fromiter((p for kf in gt.values() for p in kf.person_ids), dtype=np.int64, count=len(boxes))
    per_box = [acts for kf in gt.values() for acts in kf.labels]
    label = np.fromiter((a for acts in per_box for a in acts), dtype=np.int64)
    box = np.repeat(np.arange(len(per_box)), [len(a) for a in per_box])
    listed = np.isin(label, np.fromiter(labelmap, dtype=np.int64))
    label, box = label[listed], box[listed]
    order = np.lexsort((np.arange(len(box)), -person[box], box_frame[box]))
    label, box = label[order], box[order]
    frame_pos = box_frame[box]
    has = np.zeros(len(keys), dtype=bool)
    has[frame_pos] = True
    ids = np.full(len(keys), -1, dtype=np.int64)
    for k in np.flatnonzero(has).tolist():
        ids[k] = index.setdefault(keys[k], len(index))
    excl = np.array([k in excluded for k in keys], dtype=bool)[frame_pos]
    return ids[frame_pos], label, boxes[box], excl


def _count(labels: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.sort(labels), class_ids, side="right") - np.searchsorted(np.sort(labels), class_ids)


def _official_order(idx: np.ndarray, frame: np.ndarray, rows: DetectionRows, counts: dict) -> np.ndarray:
    """The rows (indices into ``rows``, in file order) the official top-50 heap keeps, per keyframe in its
    within-keyframe order. Vectorised where the heap's result is plain (no score tie across the 50th place,
    and no two kept rows of one class with one score, whose order the heap's array would fix); the
    keyframes left go through the heap itself."""
    counts["capped"] = 0
    if len(idx) == 0:
        return idx
    score, label = rows.score, rows.label
    idx = idx[np.lexsort((idx, -score[idx], frame[idx]))]  # by keyframe, score descending, file order
    f, sc, lab = frame[idx], score[idx], label[idx]
    starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])
    sizes = np.diff(np.r_[starts, len(f)])
    kept = np.arange(len(f)) - np.repeat(starts, sizes) < OFFICIAL_CAP
    counts["capped"] = int((~kept).sum())
    # Ties across the 50th place: more rows score at least the 50th score than 50.
    over = sizes > OFFICIAL_CAP
    threshold = np.full(len(starts), np.inf)
    threshold[over] = sc[starts[over] + OFFICIAL_CAP - 1]
    tied = over & (np.add.reduceat(sc >= np.repeat(threshold, sizes), starts) != OFFICIAL_CAP)
    # Same class and score twice in a keyframe: their order decides matching and ranking.
    o = np.lexsort((sc, lab, f))
    same = np.zeros(len(f), dtype=bool)
    same[o[1:]] = (f[o][1:] == f[o][:-1]) & (lab[o][1:] == lab[o][:-1]) & (sc[o][1:] == sc[o][:-1])
    tied |= np.add.reduceat(same & kept, starts) > 0
    if not tied.any():
        return idx[kept]
    parts = [idx[kept & ~np.repeat(tied, sizes)]]
    parts += [_heap_top(np.sort(idx[s:s + n]), rows) for s, n in zip(starts[tied], sizes[tied])]
    merged = np.concatenate(parts)
    return merged[np.argsort(frame[merged], kind="stable")]  # keyframes in order, each in its own order


def _heap_top(rows_in_file_order: np.ndarray, rows: DetectionRows) -> np.ndarray:
    """The official reader on one keyframe: a min-heap of (score, action_id, y1, x1, y2, x2) capped at 50,
    a row entering a full heap only with a strictly greater score, then a stable sort by -score."""
    heap: list[tuple] = []
    b = rows.boxes
    for i in rows_in_file_order.tolist():
        # The row index last: it breaks ties only between rows equal in every official field, which are
        # interchangeable.
        item = (float(rows.score[i]), int(rows.label[i]), float(b[i, 1]), float(b[i, 0]), float(b[i, 3]),
                float(b[i, 2]), i)
        if len(heap) < OFFICIAL_CAP:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    return np.array([t[-1] for t in sorted(heap, key=lambda t: -t[0])], dtype=np.int64)


def _true_positives(det_frame, det_label, det_box, gt_frame, gt_label, gt_box) -> np.ndarray:
    """Greedy matching without fallback, all keyframes and classes at once: a detection is a TP iff its
    best-IoU GT (first on ties) of its class and keyframe reaches the threshold and no earlier detection of
    that keyframe and class took it. Detections are in their within-keyframe order."""
    n_classes = int(max(det_label.max(initial=0), gt_label.max(initial=0))) + 1
    det_group = det_frame * n_classes + det_label
    gt_group = gt_frame * n_classes + gt_label
    gorder = np.argsort(gt_group, kind="stable")  # GT order kept within a group (argmax takes the first)
    sorted_groups = gt_group[gorder]
    lo = np.searchsorted(sorted_groups, det_group)
    n = np.searchsorted(sorted_groups, det_group, side="right") - lo
    tp = np.zeros(len(det_group), dtype=bool)
    has = np.flatnonzero(n)
    if len(has) == 0:
        return tp
    reps = n[has]
    pair_det = np.repeat(has, reps)
    offsets = np.cumsum(reps) - reps
    pair_gt = gorder[np.repeat(lo[has], reps) + np.arange(reps.sum()) - np.repeat(offsets, reps)]
    iou = box_iou_pairs(det_box[pair_det], gt_box[pair_gt])
    best = np.maximum.reduceat(iou, offsets)
    pos = np.arange(len(iou))
    first_best = np.minimum.reduceat(np.where(iou == np.repeat(best, reps), pos, len(iou)), offsets)
    matched = best >= IOU_THRESHOLD
    dets, gts = has[matched], pair_gt[first_best[matched]]
    # The first detection (in order) to reach each GT takes it; dets are increasing already.
    _, first = np.unique(gts, return_index=True)
    tp[dets[first]] = True
    return tp


def voc_ap(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> float:
    """VOC all-point AP of one class, ranking as the official code does (``np.argsort(scores)[::-1]``)."""
    order = np.argsort(scores)[::-1]
    hits = tp[order].astype(np.int64)
    cum_tp = np.cumsum(hits)
    cum_fp = np.cumsum(1 - hits)
    precision = cum_tp.astype(float) / (cum_tp + cum_fp)
    recall = cum_tp.astype(float) / num_gt
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[at] - recall[at - 1]) * precision[at]))


