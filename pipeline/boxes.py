"""Axis-aligned boxes as (N, 4) arrays of ``x1, y1, x2, y2`` (AVA: normalised to [0, 1], origin top left).

Areas are ``(x2 - x1) * (y2 - y1)`` without the +1 of pixel conventions, as the AVA evaluator computes them.
"""

from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union of every box of ``a`` with every box of ``b`` (0 where a union is 0)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def box_area(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes).reshape(-1, 4)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def clip_boxes(boxes: np.ndarray, low: float = 0.0, high: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The boxes clipped to [low, high] and a (N,) mask of those that changed (callers count them)."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    clipped = np.clip(boxes, low, high)
    return clipped, np.any(clipped != boxes, axis=1)


def valid_boxes(boxes: np.ndarray) -> np.ndarray:
    """(N,) mask of boxes with finite coordinates and positive width and height."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    return np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
