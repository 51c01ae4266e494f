"""Point-event (spotting) mAP at time tolerances: the metric of ball-action / soccer event spotting.

Per class and tolerance ``d`` seconds: the class's detections over all videos in descending score
(ties in file order); each takes the nearest still-unmatched ground truth of its class in its video
within ``|t_det - t_gt| <= d`` (a true positive) or none (a false positive); AP is the all-point
interpolated area under that precision-recall curve (as the ActivityNet evaluator's); mAP is the mean
over the classes present in the ground truth (a class without detections scores 0), per tolerance.

A detection is ``{"label", "score", "timestamp": SEC}`` (a submission's ``results`` mapping, as for
segments); the ground truth is a point-event annotation file (``pipeline.annotations``, ``timestamp``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from localizers.anet_map import APTable, _interpolated_ap
from pipeline.annotations import TemporalAnnotations
from pipeline.errors import ConfigError

TOLERANCES_S = (1.0, 2.0, 5.0)


def parse_tolerances(spec: str | Sequence[float]) -> tuple[float, ...]:
    """"1,2,5" or [1, 2, 5] -> (1.0, 2.0, 5.0): seconds, each > 0."""
    try:
        values = tuple(float(x) for x in (spec.split(",") if isinstance(spec, str) else spec))
    except ValueError:
        raise ConfigError(f"--tolerance: expected seconds separated by commas, got {spec!r}") from None
    if not values or not all(np.isfinite(t) and t > 0 for t in values):
        raise ConfigError(f"--tolerance: tolerances must be seconds > 0, got {spec!r}")
    return values


@dataclass(frozen=True)
class PointMapResult(APTable):
    THRESHOLDS = "tolerances"
    HEADER = "tolerance"
    METRIC = "spotting"

    tolerances: tuple[float, ...]
    classes: tuple[str, ...]  # the classes present in the ground truth, in annotation order
    ap: np.ndarray  # (n_tolerance, n_class)
    n_gt: np.ndarray
    n_pred: np.ndarray
    n_videos: int
    _curves: tuple = field(repr=False, default=())  # per class: (precision, recall), each (n_tol, n_pred)
    dataset: str = ""
    n_videos_gt: int = 0
    n_videos_detected: int = 0
    unknown_labels: Mapping[str, int] = field(default_factory=dict)

    @staticmethod
    def _format(t: float) -> str:
        return f"{f'{t:g}s':>6}"

    @property
    def protocol(self) -> str:
        return "point events, tolerance " + ", ".join(f"{t:g}" for t in self.tolerances) + " s"


def detection_time(det: Mapping, where: str) -> float:
    t = det.get("timestamp") if isinstance(det, Mapping) else None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t):
        raise ConfigError(f'{where}: expected {{"label", "score", "timestamp": seconds}}, got {det!r}')
    score = det.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
        raise ConfigError(f"{where}: field 'score' must be a finite number, got {score!r}")
    return float(t)


def evaluate_points(gt: TemporalAnnotations, detections: Mapping[str, Sequence[Mapping]], *,
                    subset: str | None = None, tolerances: str | Sequence[float] = TOLERANCES_S,
                    only_videos: Collection[str] | None = None, source: str = "detections",
                    dataset: str = "") -> PointMapResult:
    """Spotting mAP of ``detections`` (``{video: [{"label", "score", "timestamp"}]}``) against point-event
    ground truth; ``only_videos`` restricts both to those videos (e.g. the ones that have features)."""
    if not gt.points:
        raise ConfigError(f"{gt.path}: not point events (annotations with 'timestamp'); segments are scored "
                          f"by tIoU mAP")
    tols = parse_tolerances(tolerances)
    videos = gt.subset(subset) if subset is not None else dict(gt.videos)
    n_videos_gt = len(videos)
    if only_videos is not None:
        videos = {v: a for v, a in videos.items() if v in only_videos}
    present = {label for v in videos.values() for label in v.labels}
    classes = tuple(c for c in gt.classes if c in present)
    index = {c: k for k, c in enumerate(classes)}
    unknown: Counter = Counter()
    # per class: (score, order, video, time) of its detections; per (class, video): ground-truth times
    preds: list[list[tuple]] = [[] for _ in classes]
    for vid, dets in detections.items():
        if vid not in videos:
            continue
        for i, d in enumerate(dets):
            t = detection_time(d, f"{source}: video {vid}: detection {i}")
            label = d.get("label")
            if label not in index:
                if label not in gt.classes:
                    unknown[str(label)] += 1
                continue
            preds[index[label]].append((float(d["score"]), len(preds[index[label]]), vid, t))
    truth: dict[tuple[int, str], np.ndarray] = {}
    for vid, ann in videos.items():
        for k, c in enumerate(classes):
            times = ann.segments[[label == c for label in ann.labels], 0]
            if len(times):
                truth[(k, vid)] = times
    ap = np.zeros((len(tols), len(classes)))
    n_gt = np.array([sum(len(t) for (k, _), t in truth.items() if k == kk) for kk in range(len(classes))], int)
    curves = []
    for k in range(len(classes)):
        ranked = sorted(preds[k], key=lambda p: (-p[0], p[1]))
        tp = np.zeros((len(tols), len(ranked)))
        for j, tol in enumerate(tols):
            taken = {key: np.zeros(len(t), bool) for key, t in truth.items() if key[0] == k}
            for r, (_, _, vid, t) in enumerate(ranked):
                times = truth.get((k, vid))
                if times is None:
                    continue
                dist = np.where(taken[(k, vid)], np.inf, np.abs(times - t))
                nearest = int(np.argmin(dist))
                if dist[nearest] <= tol:
                    taken[(k, vid)][nearest] = True
                    tp[j, r] = 1
        cum_tp = np.cumsum(tp, axis=1)
        precision = cum_tp / np.arange(1, len(ranked) + 1)
        recall = cum_tp / max(n_gt[k], 1)
        curves.append((precision, recall))
        if len(ranked):
            ap[:, k] = _interpolated_ap(precision, recall)
    detected = {vid for vid, dets in detections.items() if vid in videos and dets}
    return PointMapResult(tols, classes, ap, n_gt, np.array([len(p) for p in preds], int), len(videos),
                          tuple(curves), dataset, n_videos_gt, len(detected), dict(unknown))
