"""Per-class 1-D non-maximum suppression (Gaussian soft-NMS, hard NMS, DIoU-NMS), a minimum gap between
detections of a class, and score voting, in torch.

All classes run at once: candidates are laid out as a padded (classes, candidates) matrix and each
step selects, in every class row, the highest-scoring candidate still alive and suppresses (hard, diou,
min gap) or decays (soft) the rest of its row. Selected scores never increase within a class, so a class never
needs more than `max_num` steps, and the loop stops as soon as no row has a live candidate.
No compiled extension.
"""

from __future__ import annotations

import torch


def _tiou(a_start: torch.Tensor, a_end: torch.Tensor, b_start: torch.Tensor, b_end: torch.Tensor) -> torch.Tensor:
    """Element-wise (broadcast) tIoU of segments a and b; 0 where both are empty."""
    inter = (torch.minimum(a_end, b_end) - torch.maximum(a_start, b_start)).clamp(min=0)
    union = (a_end - a_start) + (b_end - b_start) - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def segment_iou_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tIoU of every segment of `a` (N, 2) with every segment of `b` (M, 2); 0 where both are empty."""
    return _tiou(a[:, None, 0], a[:, None, 1], b[None, :, 0], b[None, :, 1])


@torch.no_grad()
def batched_nms(
    segments: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float,
    sigma: float | torch.Tensor,
    method: str = "soft",
    min_score: float = 0.0,
    max_num: int = 200,
    voting_thresh: float | None = None,
    min_gap: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Suppress overlapping segments of the same label; return at most `max_num` (segments, scores,
    labels) sorted by descending score.

    method="soft": Gaussian soft-NMS as ActionFormer's (weight exp(-tIoU^2 / sigma); `iou_threshold`
    unused), candidates whose decayed score falls below `min_score` are dropped; `sigma` a number, or a
    tensor indexed by label (a sigma per class).
    method="hard": candidates with tIoU >= `iou_threshold` to a kept one of the same label are removed;
    method="diou": the same on tIoU - (centre distance / enclosing length)^2 (DIoU-NMS: of two equally
    overlapping candidates, the one whose centre is farther off survives); method="none": no overlap
    suppression (with `min_gap`, only that). `sigma` unused but by soft. Candidates scoring below
    `min_score` are dropped in every case.
    min_gap: a tensor indexed by label; a candidate whose centre lies closer than its class's gap to a
    kept one of its label is removed (a temporal constraint: the same action cannot recur so soon).
    voting_thresh: when set, each kept segment is replaced by the score-weighted mean of the input
    segments of its label whose tIoU with it is >= voting_thresh (its own input among them).
    """
    if method not in ("soft", "hard", "diou", "none"):
        raise ValueError(f"batched_nms: method must be 'soft', 'hard', 'diou' or 'none', got {method!r}")
    n = segments.shape[0]
    empty = (segments.new_zeros((0, 2)), scores.new_zeros((0,)), labels.new_zeros((0,)))
    if n == 0 or max_num <= 0:
        return empty

    classes, row_of, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    order = torch.argsort(row_of, stable=True)
    rows = row_of[order]
    starts = torch.cumsum(counts, 0) - counts
    cols = torch.arange(n, device=segments.device) - starts[rows]
    shape = (classes.numel(), int(counts.max()))

    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    live = scores.new_full(shape, float("-inf"))
    live[rows, cols] = scores[order]
    start = segments.new_zeros(shape)
    end = segments.new_zeros(shape)
    start[rows, cols] = segments[order, 0]
    end[rows, cols] = segments[order, 1]
    source = torch.full(shape, -1, dtype=torch.long, device=segments.device)
    source[rows, cols] = order
    live = torch.where(live >= min_score, live, neg_inf)
    if isinstance(sigma, torch.Tensor):  # per class: the sigma of each row's label
        sigma = sigma.to(scores.device, scores.dtype)[classes][:, None]
    centre = 0.5 * (start + end)
    gap = None if min_gap is None else min_gap.to(segments.device, segments.dtype)[classes][:, None]

    row_ids = torch.arange(shape[0], device=segments.device)
    picked_src, picked_score = [], []
    for _ in range(min(shape[1], max_num)):
        best_score, best = live.max(dim=1)
        has = best_score > neg_inf
        if not bool(has.any()):
            break
        picked_src.append(source[row_ids[has], best[has]])
        picked_score.append(best_score[has])
        live[row_ids[has], best[has]] = neg_inf

        b_start, b_end = start[row_ids, best][:, None], end[row_ids, best][:, None]
        if method == "soft":
            iou = _tiou(b_start, b_end, start, end)
            decayed = live * torch.exp(-(iou * iou) / sigma)
            decayed = torch.where(decayed >= min_score, decayed, neg_inf)
            live = torch.where(has[:, None], decayed, live)
        elif method == "hard":
            live = torch.where(has[:, None] & (_tiou(b_start, b_end, start, end) >= iou_threshold), neg_inf, live)
        elif method == "diou":
            enclosing = torch.maximum(b_end, end) - torch.minimum(b_start, start)
            penalty = torch.square((centre - 0.5 * (b_start + b_end)) / enclosing.clamp(min=torch.finfo(end.dtype).tiny))
            diou = _tiou(b_start, b_end, start, end) - penalty
            live = torch.where(has[:, None] & (diou >= iou_threshold), neg_inf, live)
        if gap is not None:
            near = (centre - centre[row_ids, best][:, None]).abs() < gap
            live = torch.where(has[:, None] & near, neg_inf, live)

    src = torch.cat(picked_src)
    out_scores = torch.cat(picked_score)
    top = torch.argsort(out_scores, descending=True, stable=True)[:max_num]
    src, out_scores = src[top], out_scores[top]
    out_segments = segments[src]
    out_labels = labels[src]
    if voting_thresh is not None:
        out_segments = _vote(out_segments, out_labels, segments, scores, labels, voting_thresh)
    return out_segments, out_scores, out_labels


def _vote(kept, kept_labels, segments, scores, labels, thresh: float) -> torch.Tensor:
    weights = (segment_iou_matrix(kept, segments) >= thresh) & (kept_labels[:, None] == labels[None, :])
    weights = weights.to(scores.dtype) * scores[None, :]
    total = weights.sum(dim=1, keepdim=True)
    # `total` is 0 only for an empty kept segment or zero scores: that segment stays as it is
    return torch.where(total > 0, (weights @ segments) / total.clamp(min=torch.finfo(total.dtype).tiny), kept)
