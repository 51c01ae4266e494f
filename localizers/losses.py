"""Sigmoid focal loss and the 1-D IoU losses (DIoU, GIoU) on centre-based offsets."""

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


def iou_loss_1d(pred: torch.Tensor, target: torch.Tensor, kind: str = "diou", eps: float = 1e-8) -> torch.Tensor:
    """Per-row loss of ``(N, 2)`` offsets ``(left, right)`` from the same centre point.

    ``diou``: 1 - IoU + (centre distance / enclosing length)^2; ``giou``: 1 - IoU + (enclosing - union) / enclosing.
    """
    pred, target = pred.float(), target.float()
    lp, rp = pred[:, 0], pred[:, 1]
    lg, rg = target[:, 0], target[:, 1]
    inter = torch.minimum(lp, lg) + torch.minimum(rp, rg)
    union = (lp + rp) + (lg + rg) - inter
    iou = inter / union.clamp(min=eps)
    enclosing = torch.maximum(lp, lg) + torch.maximum(rp, rg)
    if kind == "giou":
        return 1.0 - iou + (enclosing - union) / enclosing.clamp(min=eps)
    rho = 0.5 * (rp - lp - rg + lg)
    return 1.0 - iou + torch.square(rho / enclosing.clamp(min=eps))
