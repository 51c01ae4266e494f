"""Axis-aligned boxes as (N, 4) arrays of ``x1, y1, x2, y2`` (AVA: normalised to [0, 1], origin top left).

Areas are ``(x2 - x1) * (y2 - y1)`` without the +1 of pixel conventions, as the AVA evaluator computes them.
"""

from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union of every box of ``a`` with every box of ``b``."""
    a, b = np.asarray(a).reshape(-1, 4), np.asarray(b).reshape(-1, 4)
    return box_iou_pairs(a[:, None, :], b[None, :, :])


def box_iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box ``a[i]`` with box ``b[i]`` (any broadcastable (..., 4) arrays; 0 where a union is 0).

    Operation for operation the AVA evaluator's arithmetic: differences and areas in the boxes' own dtype
    (float32 boxes as mmaction2 casts them, float64 as the official code), intersection and IoU in float64,
    so that an IoU at exactly the threshold falls on the same side as there."""
    a, b = np.asarray(a), np.asarray(b)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if not np.issubdtype(b.dtype, np.floating):
        b = b.astype(np.float64)
    ih = np.clip((np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).astype(np.float64), 0, None)
    iw = np.clip((np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).astype(np.float64), 0, None)
    inter = ih * iw
    union = (box_area(a) + box_area(b)) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def box_area(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes)
    return (boxes[..., 3] - boxes[..., 1]) * (boxes[..., 2] - boxes[..., 0])


def clip_boxes(boxes: np.ndarray, low: float = 0.0, high: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The boxes clipped to [low, high] and a (N,) mask of those that changed (callers count them)."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    clipped = np.clip(boxes, low, high)
    return clipped, np.any(clipped != boxes, axis=1)


def valid_boxes(boxes: np.ndarray) -> np.ndarray:
    """(N,) mask of boxes with finite coordinates and positive width and height."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    return np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
