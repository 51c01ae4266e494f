"""ActivityNet temporal detection mAP, vectorised, with the official evaluator's exact semantics.

The protocol (activitynet/ActivityNet Evaluation/eval_detection.py), per class: predictions sorted by
descending score; each is matched to the still-unmatched ground truth of the same video with the highest
tIoU at or above the threshold; all-point interpolated AP; mAP over the classes present in the ground
truth; a class without predictions scores 0. Details that decide numbers, reproduced on purpose:
- score order is `np.argsort(scores)[::-1]` over the class's predictions in file order, so ties break
  exactly as there; ground truths are tried in `np.argsort(tiou)[::-1]` order, computed row by row on
  arrays of the same length, so tIoU ties break as there too;
- tIoU is computed with the same float expression; two empty segments give 0/0 = nan, which the
  official loop treats as a match at every threshold (nan is never `< thr`) and sorts first;
- thresholds parsed from "start:stop:step" are `np.linspace` values, as the official defaults.

Instead of the official loop over predictions, the greedy matching runs as one step per rank within a
(class, video) group, over all groups and thresholds at once, and only over the pairs that can ever
match (tIoU at or above the lowest threshold, or nan).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.annotations import TemporalAnnotations, VideoAnnotation
from pipeline.errors import ConfigError

THUMOS_TIOUS = "0.3:0.7:0.1"
ANET_TIOUS = "0.5:0.95:0.05"


def parse_tious(spec: str | Sequence[float]) -> tuple[float, ...]:
    """"0.3:0.7:0.1" -> np.linspace(0.3, 0.7, 5) (the official values); "0.5,0.7" -> (0.5, 0.7)."""
    if not isinstance(spec, str):
        values = tuple(float(t) for t in spec)
    elif ":" in spec:
        try:
            start, stop, step = (float(x) for x in spec.split(":"))
        except ValueError:
            raise ConfigError(f"--tiou: expected start:stop:step, got {spec!r}") from None
        if step <= 0 or stop < start:
            raise ConfigError(f"--tiou: expected start <= stop and step > 0, got {spec!r}")
        values = tuple(float(t) for t in np.linspace(start, stop, int(round((stop - start) / step)) + 1))
    else:
        try:
            values = tuple(float(x) for x in spec.split(","))
        except ValueError:
            raise ConfigError(f"--tiou: expected numbers separated by commas, got {spec!r}") from None
    if not values or not all(0.0 < t <= 1.0 for t in values):
        raise ConfigError(f"--tiou: thresholds must lie in (0, 1], got {spec!r}")
    return values


class APTable:
    """Means, notes, the text table and the JSON of per-threshold, per-class APs: detection mAP over
    tIoUs here, spotting mAP over time tolerances (localizers.point_map). A result dataclass holds the
    fields (``ap``, ``classes``, ``n_gt``, ...) and names its thresholds."""

    THRESHOLDS = "tious"  # the field holding the thresholds, and its JSON key
    HEADER = "tIoU"       # their row title in the table
    METRIC = "detection"

    @staticmethod
    def _format(t: float) -> str:
        return f"{t:>6.2f}"

    @property
    def _thresholds(self) -> tuple[float, ...]:
        return getattr(self, self.THRESHOLDS)

    def notes(self) -> list[str]:
        """What a reader must know to trust the numbers: videos left out or never detected, labels
        that belong to no class of the ground truth."""
        out = []
        if self.n_videos_gt > self.n_videos:
            out.append(f"evaluated {self.n_videos} of the {self.n_videos_gt} videos of the ground truth "
                       f"(the others were left out)")
        if self.n_videos_detected < self.n_videos:
            out.append(f"detections cover {self.n_videos_detected} of the {self.n_videos} evaluated videos; "
                       f"the ground truth of the other {self.n_videos - self.n_videos_detected} counts as missed")
        if self.unknown_labels:
            listed = ", ".join(f"{k!r} ({n})" for k, n in sorted(self.unknown_labels.items())[:5])
            more = ", ..." if len(self.unknown_labels) > 5 else ""
            out.append(f"{sum(self.unknown_labels.values())} detections with {len(self.unknown_labels)} labels "
                       f"that are not classes of the ground truth were ignored: {listed}{more}")
        return out

    @property
    def mAP(self) -> np.ndarray:
        return self.ap.mean(axis=1) if self.ap.shape[1] else np.zeros(len(self._thresholds))

    @property
    def average_mAP(self) -> float:
        return float(self.mAP.mean())

    def pr_curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """class -> (precision, recall), each (n_thresholds, n_predictions of the class) in score order:
        the points the official AP interpolates. Empty arrays for a class without predictions."""
        return dict(zip(self.classes, self._curves))

    def table(self, per_class: bool = True) -> str:
        name = f"{self.dataset} " if self.dataset else ""
        lines = [
            f"{name}{self.METRIC} mAP (%) ({self.protocol}) over {len(self.classes)} classes, {self.n_videos} videos",
            f"{self.HEADER:<9} " + " ".join(self._format(t) for t in self._thresholds) + "    avg",
            "mAP       " + " ".join(f"{100 * m:6.2f}" for m in self.mAP) + f" {100 * self.average_mAP:6.2f}",
        ]
        if per_class and self.classes:
            width = max(len(c) for c in self.classes)
            lines += ["", f"{'class':<{width}} {'n_gt':>5} {'n_pred':>6}  AP (%) per {self.HEADER}, avg"]
            for k, name in enumerate(self.classes):
                aps = " ".join(f"{100 * a:6.2f}" for a in self.ap[:, k])
                avg = 100 * float(self.ap[:, k].mean())
                lines.append(f"{name:<{width}} {self.n_gt[k]:>5d} {self.n_pred[k]:>6d}  {aps} {avg:6.2f}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes()])

    def to_json(self) -> dict:
        return {
            self.THRESHOLDS: list(self._thresholds),
            "mAP": [float(m) for m in self.mAP],
            "average_mAP": self.average_mAP,
            "n_videos": self.n_videos,
            "n_videos_gt": self.n_videos_gt,
            "n_videos_detected": self.n_videos_detected,
            "dataset": self.dataset,
            "protocol": self.protocol,
            "unknown_labels": dict(self.unknown_labels),
            "notes": self.notes(),
            "per_class": {
                name: {
                    "ap": [float(a) for a in self.ap[:, k]],
                    "average_ap": float(self.ap[:, k].mean()),
                    "n_gt": int(self.n_gt[k]),
                    "n_pred": int(self.n_pred[k]),
                }
                for k, name in enumerate(self.classes)
            },
        }


@dataclass(frozen=True)
class MapResult(APTable):
    tious: tuple[float, ...]
    classes: tuple[str, ...]  # the classes present in the ground truth, in annotation order
    ap: np.ndarray  # (n_tiou, n_class)
    n_gt: np.ndarray  # (n_class,)
    n_pred: np.ndarray  # (n_class,)
    n_videos: int
    _curves: tuple = field(repr=False, default=())  # per class: (precision, recall), each (n_tiou, n_pred)
    dataset: str = ""  # what the table calls the ground truth ("thumos", an annotation file's stem)
    n_videos_gt: int = 0  # videos of the subset before ``only_videos``
    n_videos_detected: int = 0  # evaluated videos with at least one detection
    unknown_labels: Mapping[str, int] = field(default_factory=dict)  # label not in the GT -> detections

    @property
    def protocol(self) -> str:
        """The evaluation protocol the thresholds name (THUMOS14's or ActivityNet's), with its range."""
        rounded = tuple(round(t, 4) for t in self.tious)
        span = f"tIoU {min(self.tious):.2f}:{max(self.tious):.2f}" if len(self.tious) > 1 else f"tIoU {self.tious[0]:.2f}"
        for name, spec in (("THUMOS14", THUMOS_TIOUS), ("ActivityNet", ANET_TIOUS)):
            if rounded == tuple(round(t, 4) for t in parse_tious(spec)):
                return f"{name} protocol, {span}"
        return span


def evaluate_detections(
    gt: TemporalAnnotations | Mapping[str, VideoAnnotation],
    detections: Mapping[str, Sequence[Mapping]],
    subset: str | None = None,
    tious: str | Sequence[float] = THUMOS_TIOUS,
    source: str = "detections",
    only_videos: Collection[str] | None = None,
    dataset: str = "",
) -> MapResult:
    """mAP of `detections` (video -> [{"label", "score", "segment": [start, end]}], in file order)
    against the ground truth of `subset` (all videos when None), restricted to `only_videos` when given
    (e.g. the videos that have features: the others would count as misses).

    `gt` is the loaded annotations, or an already selected mapping video -> VideoAnnotation. A detection
    whose label is not a class of the annotations is counted in `unknown_labels` and ignored, as is one
    whose class has no ground truth in the subset; one on a video without ground truth of its class is
    a false positive. `source` names the detections in error messages (e.g. their file); `dataset` names
    the ground truth in the table."""
    tious = parse_tious(tious)
    if isinstance(gt, TemporalAnnotations):
        known = gt.classes
        videos = gt.subset(subset) if subset is not None else gt.videos
        if not videos:
            raise ConfigError(f"{gt.path}: no video in subset {subset!r}")
    else:
        videos = dict(gt)
        known = tuple(sorted({label for v in videos.values() for label in v.labels}))
    n_videos_gt = len(videos)
    if only_videos is not None:
        wanted = set(only_videos)
        videos = {vid: v for vid, v in videos.items() if vid in wanted}
    present = {label for v in videos.values() for label in v.labels}
    classes = tuple(c for c in known if c in present)
    class_of = {c: k for k, c in enumerate(classes)}
    video_code = {vid: i for i, vid in enumerate(videos)}

    g_video, g_class, g_seg = _ground_truth_arrays(videos, class_of)
    p_video, p_class, p_seg, p_score, unknown = _detection_arrays(detections, set(known), class_of, video_code,
                                                                  source)
    n_cls, n_thr = len(classes), len(tious)
    thresholds = np.asarray(tious)

    # Rank of every prediction within its class, official order.
    order_by_class = np.argsort(p_class, kind="stable")
    class_starts = np.searchsorted(p_class[order_by_class], np.arange(n_cls + 1))
    pieces = [np.empty(0, dtype=np.int64)]
    for k in range(n_cls):
        members = order_by_class[class_starts[k] : class_starts[k + 1]]
        pieces.append(members[np.argsort(p_score[members])[::-1]])
    ranked = np.concatenate(pieces)
    rank = np.empty(len(p_class), dtype=np.int64)
    rank[ranked] = np.arange(len(ranked)) - np.repeat(class_starts[:-1], np.diff(class_starts))

    tp = _match(p_video, p_class, p_seg, rank, g_video, g_class, g_seg, thresholds)

    n_gt = np.bincount(g_class, minlength=n_cls)
    n_pred = np.diff(class_starts)
    ap = np.zeros((n_thr, n_cls))
    curves = []
    for k in range(n_cls):
        hits = tp[:, ranked[class_starts[k] : class_starts[k + 1]]]
        if hits.shape[1] == 0:
            curves.append((np.zeros((n_thr, 0)), np.zeros((n_thr, 0))))
            continue
        tp_cum = np.cumsum(hits, axis=1, dtype=np.float64)
        fp_cum = np.cumsum(1.0 - hits, axis=1, dtype=np.float64)
        recall = tp_cum / float(n_gt[k])
        precision = tp_cum / (tp_cum + fp_cum)
        ap[:, k] = _interpolated_ap(precision, recall)
        curves.append((precision, recall))
    return MapResult(
        tious=tious,
        classes=classes,
        ap=ap,
        n_gt=n_gt,
        n_pred=n_pred,
        n_videos=len(videos),
        _curves=tuple(curves),
        dataset=dataset,
        n_videos_gt=n_videos_gt,
        n_videos_detected=sum(1 for vid in videos if detections.get(vid)),
        unknown_labels=unknown,
    )


def _ground_truth_arrays(videos, class_of):
    """Ground truth in the official frame's order: video by video (file order), then annotation order."""
    counts = [len(v.labels) for v in videos.values()]
    total = sum(counts)
    g_video = np.repeat(np.arange(len(videos)), counts)
    g_class = np.fromiter((class_of[label] for v in videos.values() for label in v.labels), np.int64, total)
    g_seg = np.concatenate([v.segments for v in videos.values()]) if total else np.zeros((0, 2))
    return g_video, g_class, g_seg.astype(np.float64, copy=False)


def _detection_arrays(detections, known: set, class_of, video_code, source: str):
    vids, labels, scores, starts, ends = [], [], [], [], []
    for vid, dets in detections.items():
        if not isinstance(dets, (list, tuple)):
            raise ConfigError(f"{source}: video {vid}: expected a list of detections")
        try:
            labels += [d["label"] for d in dets]
            scores += [d["score"] for d in dets]
            segs = [d["segment"] for d in dets]
            starts += [s[0] for s in segs]
            ends += [s[1] for s in segs]
        except (KeyError, TypeError, IndexError):
            raise ConfigError(
                f"{source}: video {vid}: every detection needs 'label', 'score' and 'segment': [start, end]"
            ) from None
        vids.append((vid, len(dets)))
    owner = np.repeat(np.arange(len(vids)), [n for _, n in vids])
    try:
        p_score = np.asarray(scores, dtype=np.float64)
        p_seg = np.stack([np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64)], axis=1)
    except (TypeError, ValueError):
        i = next(i for i, x in enumerate(zip(scores, starts, ends)) if not all(map(_is_number, x)))
        raise ConfigError(
            f"{source}: video {vids[owner[i]][0]}: score and segment must be numbers, got "
            f"score {scores[i]!r}, segment [{starts[i]!r}, {ends[i]!r}]"
        ) from None
    invalid = ~np.isfinite(p_score) | ~np.isfinite(p_seg).all(axis=1) | (p_seg[:, 1] < p_seg[:, 0])
    if invalid.any():
        i = int(np.flatnonzero(invalid)[0])
        raise ConfigError(
            f"{source}: video {vids[owner[i]][0]}: invalid detection (score {scores[i]!r}, "
            f"segment [{starts[i]!r}, {ends[i]!r}]): need finite numbers and end >= start"
        )
    unknown = dict(Counter(label for label in labels if label not in known))
    p_class = np.fromiter((class_of.get(label, -1) for label in labels), np.int64, len(labels))
    codes = np.fromiter((video_code.get(vid, -1) for vid, _ in vids), np.int64, len(vids))
    p_video = codes[owner] if len(owner) else np.zeros(0, dtype=np.int64)
    keep = p_class >= 0
    return p_video[keep], p_class[keep], p_seg[keep], p_score[keep], unknown


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _match(p_video, p_class, p_seg, rank, g_video, g_class, g_seg, thresholds) -> np.ndarray:
    """tp (n_thr, n_pred) of the official greedy matching."""
    n_thr, n_pred = len(thresholds), len(p_video)
    tp = np.zeros((n_thr, n_pred))
    if n_pred == 0 or len(g_video) == 0:
        return tp

    # Ground truth grouped by (class, video), in file order within a group, as the official frames.
    n_videos = int(max(g_video.max(), p_video.max()) + 1)
    g_group = g_class * n_videos + g_video
    g_order = np.argsort(g_group, kind="stable")
    groups, g_first, g_count = np.unique(g_group[g_order], return_index=True, return_counts=True)

    p_group = p_class * n_videos + p_video
    slot = np.searchsorted(groups, p_group)
    slot = np.minimum(slot, len(groups) - 1)
    has_gt = (p_video >= 0) & (groups[slot] == p_group)
    preds = np.flatnonzero(has_gt)
    if len(preds) == 0:
        return tp
    slot = slot[preds]

    # Every (prediction, ground truth of its group) pair, in ground-truth order.
    n_pairs = g_count[slot]
    pair_pred = np.repeat(np.arange(len(preds)), n_pairs)
    within = np.arange(n_pairs.sum()) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
    pair_gt = g_order[np.repeat(g_first[slot], n_pairs) + within]
    ps, gs = p_seg[preds][pair_pred], g_seg[pair_gt]
    inter = (np.minimum(ps[:, 1], gs[:, 1]) - np.maximum(ps[:, 0], gs[:, 0])).clip(0)
    union = (gs[:, 1] - gs[:, 0]) + (ps[:, 1] - ps[:, 0]) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        tiou = inter / union

    # Position of each ground truth in the official visiting order `argsort(tiou)[::-1]`, computed on
    # rows of the official length so that ties resolve identically.
    visit = np.empty(len(tiou), dtype=np.int64)
    row_start = np.cumsum(n_pairs) - n_pairs
    for n in np.unique(n_pairs):
        rows = np.flatnonzero(n_pairs == n)
        cols = row_start[rows][:, None] + np.arange(n)
        order = np.argsort(tiou[cols], axis=1)[:, ::-1]
        pos = np.empty_like(order)
        np.put_along_axis(pos, order, np.arange(n)[None, :], axis=1)
        visit[cols] = pos

    # Only pairs that can match at some threshold matter: tIoU >= the lowest one, or nan.
    usable = (tiou >= thresholds.min()) | np.isnan(tiou)
    pair_pred, pair_gt, tiou, visit = pair_pred[usable], pair_gt[usable], tiou[usable], visit[usable]
    if len(pair_pred) == 0:
        return tp

    # Pad candidates to (prediction, candidate) in visiting order.
    by = np.lexsort((visit, pair_pred))
    pair_pred, pair_gt, tiou = pair_pred[by], pair_gt[by], tiou[by]
    cand_count = np.bincount(pair_pred, minlength=len(preds))
    width = int(cand_count.max())
    col = np.arange(len(pair_pred)) - np.repeat(np.cumsum(cand_count) - cand_count, cand_count)
    cand_gt = np.full((len(preds), width), -1, dtype=np.int64)
    cand_tiou = np.full((len(preds), width), -np.inf)
    cand_gt[pair_pred, col] = pair_gt
    cand_tiou[pair_pred, col] = tiou
    # (n_thr, pred, candidate): can this candidate take this prediction at this threshold?
    allowed = (cand_tiou[None] >= thresholds[:, None, None]) | np.isnan(cand_tiou)[None]

    # One step per rank within a group: the k-th prediction of every group at once, all thresholds.
    group_of = slot
    step_order = np.lexsort((rank[preds], group_of))
    starts_of_group = np.searchsorted(group_of[step_order], np.unique(group_of))
    step = np.arange(len(preds)) - np.repeat(starts_of_group, np.diff(np.append(starts_of_group, len(preds))))
    locked = np.zeros((n_thr, len(g_video) + 1), dtype=bool)  # last column: padding, never free
    locked[:, -1] = True
    for k in range(int(step.max()) + 1):
        active = step_order[step == k]
        gts = cand_gt[active]  # (A, W); -1 indexes the padding column
        free = allowed[:, active, :] & ~locked[:, gts]
        hit = free.any(axis=2)  # (n_thr, A)
        first = free.argmax(axis=2)
        chosen = gts[np.arange(len(active))[None, :], first]  # (n_thr, A)
        t_idx, a_idx = np.nonzero(hit)
        locked[t_idx, chosen[t_idx, a_idx]] = True
        tp[:, preds[active]] = hit
    return tp


def _interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """All-point interpolated AP of each row (VOC 2011), as the official `interpolated_prec_rec`."""
    n = precision.shape[0]
    mprec = np.hstack([np.zeros((n, 1)), precision, np.zeros((n, 1))])
    mrec = np.hstack([np.zeros((n, 1)), recall, np.ones((n, 1))])
    mprec = np.maximum.accumulate(mprec[:, ::-1], axis=1)[:, ::-1]
    steps = mrec[:, 1:] != mrec[:, :-1]
    out = np.empty(n)
    for t in range(n):
        idx = np.flatnonzero(steps[t]) + 1
        out[t] = np.sum((mrec[t, idx] - mrec[t, idx - 1]) * mprec[t, idx])
    return out
