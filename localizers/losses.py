"""Classification losses (sigmoid focal, quality focal), the 1-D IoU losses (DIoU, GIoU, EIoU) on
centre-based offsets, and the distribution focal loss of boundary distributions (TBTFormer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Element-wise focal loss (RetinaNet); the caller reduces."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def quality_focal_loss(logits: torch.Tensor, targets: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Element-wise quality focal loss (GFL, Li et al. 2020): binary cross-entropy against a soft target
    in [0, 1] (a positive's localisation quality, 0 elsewhere), scaled by ``|target - p|^beta``."""
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return ce * (targets - torch.sigmoid(logits)).abs().pow(beta)


def _overlap(pred: torch.Tensor, target: torch.Tensor, eps: float):
    """Intersection-over-union of ``(N, 2)`` (left, right) offsets from the same centre point, the
    offsets themselves and the enclosing length."""
    pred, target = pred.float(), target.float()
    lp, rp = pred[:, 0], pred[:, 1]
    lg, rg = target[:, 0], target[:, 1]
    inter = torch.minimum(lp, lg) + torch.minimum(rp, rg)
    union = (lp + rp) + (lg + rg) - inter
    iou = inter / union.clamp(min=eps)
    enclosing = torch.maximum(lp, lg) + torch.maximum(rp, rg)
    return iou, union, enclosing, (lp, rp, lg, rg)


def offsets_iou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-row tIoU of ``(N, 2)`` offsets from the same centre point."""
    return _overlap(pred, target, eps)[0]


def iou_loss_1d(pred: torch.Tensor, target: torch.Tensor, kind: str = "diou", eps: float = 1e-8) -> torch.Tensor:
    """Per-row loss of ``(N, 2)`` offsets ``(left, right)`` from the same centre point.

    ``diou``: 1 - IoU + (centre distance / enclosing length)^2; ``giou``: 1 - IoU + (enclosing - union) /
    enclosing; ``eiou``: DIoU + (length difference / enclosing length)^2 (the 1-D EIoU: the length is
    fitted directly, not only through the overlap).
    """
    iou, union, enclosing, (lp, rp, lg, rg) = _overlap(pred, target, eps)
    if kind == "giou":
        return 1.0 - iou + (enclosing - union) / enclosing.clamp(min=eps)
    rho = 0.5 * (rp - lp - rg + lg)
    loss = 1.0 - iou + torch.square(rho / enclosing.clamp(min=eps))
    if kind == "eiou":
        loss = loss + torch.square(((lp + rp) - (lg + rg)) / enclosing.clamp(min=eps))
    return loss


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row DFL (GFL) of ``(N, 2, R + 1)`` logits over the distances ``0 .. R`` of each boundary and
    ``(N, 2)`` target distances: cross-entropy on the two bins around the target, weighted by
    closeness, so the distribution's mass concentrates there and its expectation is the target. Targets
    beyond ``R`` are clamped (just below, so the upper bin exists); rows averaged over the two boundaries."""
    r = logits.shape[-1] - 1
    t = target.float().clamp(0, r - 1e-3)
    left = t.floor().long()
    w_right = t - left
    logp = F.log_softmax(logits.float(), dim=-1)
    nll_left = -logp.gather(-1, left[..., None])[..., 0]
    nll_right = -logp.gather(-1, (left + 1)[..., None])[..., 0]
    return ((1 - w_right) * nll_left + w_right * nll_right).mean(-1)


def expected_distance(logits: torch.Tensor) -> torch.Tensor:
    """``(..., R + 1)`` logits over the distances ``0 .. R`` -> the expected distance ``(...)``."""
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    return torch.softmax(logits.float(), dim=-1) @ bins
