"""Label assignment: which points are positives for which action, vectorised over a batch.

A point at ``t`` with stride ``s`` is a positive of a ground-truth segment when it lies within the
segment's centre region (``centre +- radius * s``, clipped to the segment) and its largest distance to
the two boundaries falls within the level's regression range. Among several such segments the shortest
wins (ties within 1e-3 keep all their labels: THUMOS has duplicates with different labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def assign_targets(points: torch.Tensor, segments: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                   num_classes: int, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """points ``(P, 4)`` ``[t, lo, hi, stride]``; segments ``(B, N, 2)`` on the input grid; labels ``(B, N)``;
    valid ``(B, N)`` (padding of the per-video lists).

    Returns class targets ``(B, P, K)`` in {0, 1} and regression targets ``(B, P, 2)``: distances to the
    left / right boundary of the assigned segment divided by the point's stride.
    """
    b, n = labels.shape
    p = points.shape[0]
    if n == 0:
        return points.new_zeros(b, p, num_classes), points.new_zeros(b, p, 2)
    t = points[None, :, 0, None]                       # (1, P, 1)
    lo, hi, stride = points[None, :, 1, None], points[None, :, 2, None], points[None, :, 3, None]
    start, end = segments[:, None, :, 0], segments[:, None, :, 1]   # (B, 1, N)
    left, right = t - start, end - t                   # (B, P, N)
    centre = 0.5 * (start + end)
    c_left = t - torch.maximum(centre - stride * radius, start)
    c_right = torch.minimum(centre + stride * radius, end) - t
    inside = torch.minimum(c_left, c_right) > 0
    reach = torch.maximum(left, right)
    in_range = (reach >= lo) & (reach <= hi)
    lens = (end - start).expand(b, p, n)
    lens = lens.masked_fill(~(inside & in_range & valid[:, None, :]), float("inf"))
    min_len, min_idx = lens.min(dim=2)
    chosen = (lens <= min_len[..., None] + 1e-3) & torch.isfinite(lens)
    one_hot = F.one_hot(labels.clamp(min=0), num_classes).to(points.dtype)      # (B, N, K)
    cls_targets = torch.bmm(chosen.to(points.dtype), one_hot).clamp_(0.0, 1.0)
    reg = torch.stack((left, right), dim=-1)           # (B, P, N, 2)
    reg_targets = torch.gather(reg, 2, min_idx[:, :, None, None].expand(b, p, 1, 2))[:, :, 0]
    return cls_targets, reg_targets / points[None, :, 3, None]
