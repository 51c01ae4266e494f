"""Training and test items: annotations mapped onto each video's feature grid ONCE, then cheap crops.

A :class:`VideoItem` holds what every epoch needs (length, segments on the feature grid, class ids,
the video's TimeGrid); the features stay in their source (the feature store, read per crop window, or
arrays in memory) so memory does not grow with the dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.timemap import TimeGrid

END_TOLERANCE_S = 1.0


class FeatureSource(Protocol):
    """Anything that reads ``(T, C)`` features of a video: a ``pipeline.store.FeatureStore`` or :class:`ArraySource`."""

    def read(self, vid: str, start: int | None = None, stop: int | None = None) -> np.ndarray: ...


class ArraySource:
    """Features held in memory: ``{video_id: (T, C) array}``."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = dict(arrays)

    def read(self, vid: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        return np.asarray(self.arrays[vid][start:stop], dtype=np.float32)


@dataclass(frozen=True)
class VideoItem:
    id: str
    length: int                      # feature steps as stored
    grid: TimeGrid                   # seconds <-> steps of the model's input (after any resize)
    duration: float                  # seconds (clip of the output segments)
    segments: np.ndarray = field(repr=False)   # (N, 2) float32 on the model's input grid
    labels: np.ndarray = field(repr=False)     # (N,) int64
    resize_to: int | None = None

    @property
    def input_length(self) -> int:
        return self.resize_to or self.length


def read_features(source: FeatureSource, item: VideoItem, start: int | None = None,
                  stop: int | None = None) -> torch.Tensor:
    """``(T, C)`` float32 features of the model's input grid (resized to ``resize_to`` first)."""
    if item.resize_to is None:
        return torch.from_numpy(np.ascontiguousarray(source.read(item.id, start, stop), dtype=np.float32))
    feats = torch.from_numpy(np.ascontiguousarray(source.read(item.id), dtype=np.float32))
    if feats.shape[0] != item.resize_to:
        feats = F.interpolate(feats.t()[None], size=item.resize_to, mode="linear", align_corners=False)[0].t()
    return feats[start:stop].contiguous()


def make_item(vid: str, shape: tuple[int, int], grid: TimeGrid, duration: float | None,
              segments_s: np.ndarray, labels: Sequence[str], label_index: Mapping[str, int], input_dim: int,
              min_length: int, resize_to: int | None = None, where: str = "annotations",
              check_segments: bool = True, outside: str = "error", features: str = "features",
              points: bool = False) -> VideoItem:
    """Validate one video and map its annotation onto the feature grid; ConfigError names video and field
    (``where``: the annotation file, ``features``: the feature store).

    The length rule applies to what the model sees: features resized to ``resize_to`` steps (ActivityNet)
    may be shorter than the coarsest FPN stride as stored. ``check_segments=False`` for test videos:
    their ground truth goes to the evaluator untouched (the official THUMOS14 test set has segments past
    the end of their videos). ``outside="drop"`` leaves segments outside the video out instead of failing
    on them. ``points``: the annotations are point events, ``[t, t]``, which are not empty segments."""
    length, dim = shape
    if dim != input_dim:
        raise ConfigError(f"{features}: video {vid}: feature dimension {dim} != localize.input_dim {input_dim}")
    if length < 1 or (resize_to or length) < min_length:
        raise ConfigError(f"{features}: video {vid}: {length} feature steps"
                          + (f" resized to {resize_to}" if resize_to else "")
                          + f", shorter than one step of the coarsest FPN level ({min_length}); "
                          f"extract it with a smaller stride or leave it out of the annotations")
    if duration is None or not math.isfinite(duration) or duration <= 0:
        duration = float(grid.to_seconds(length - 1) + grid.offset / grid.fps)
    segments_s = np.asarray(segments_s, dtype=np.float64).reshape(-1, 2)
    ids = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        if label not in label_index:
            raise ConfigError(f"{where}: video {vid}: annotations[{i}].label {label!r} is not in the class list")
        ids[i] = label_index[label]
    keep = np.ones(len(segments_s), dtype=bool)
    for i, (start, end) in enumerate(segments_s if check_segments else ()):
        if start < -END_TOLERANCE_S or end > duration + END_TOLERANCE_S or end < start or (end == start and not points):
            if outside == "drop":
                keep[i] = False
                continue
            raise ConfigError(f"{where}: video {vid}: annotations[{i}].segment [{start:g}, {end:g}] lies outside "
                              f"the video (0 - {duration:g} s) or is empty; --set "
                              f"localize.segments_outside=drop leaves such segments out")
    segments_s, ids = segments_s[keep], ids[keep]
    if resize_to is not None:
        # the official ActivityNet recipe: features stretched to resize_to steps spanning the video
        grid = TimeGrid(fps=resize_to / duration, stride=1, clip_len=1)
    segs = grid.to_index(segments_s).astype(np.float32).reshape(-1, 2)
    return VideoItem(vid, length, grid, float(duration), segs, ids, resize_to)


@dataclass(frozen=True)
class Crop:
    start: int
    stop: int
    segments: np.ndarray
    labels: np.ndarray


def random_crop(item: VideoItem, max_seq_len: int, trunc_thresh: float, crop_ratio: tuple[float, float] | None,
                rng: np.random.Generator, max_trials: int = 200) -> Crop:
    """A training window as the official ``truncate_feats``: ``max_seq_len`` steps of a longer video (a
    random fraction within crop_ratio of a shorter one), retried until it keeps at least trunc_thresh of
    one action; segments are cut to the window (with the feature's half-clip of slack) and shifted."""
    n = item.input_length
    window = max_seq_len
    if n <= max_seq_len:
        if crop_ratio is None:
            return Crop(0, n, item.segments, item.labels)
        window = int(rng.integers(max(round(crop_ratio[0] * n), 1), min(round(crop_ratio[1] * n), n) + 1))
        if window == n:
            return Crop(0, n, item.segments, item.labels)
    slack = item.grid.offset / item.grid.stride
    segs = item.segments
    area = np.abs(segs[:, 1] - segs[:, 0])
    for _ in range(max_trials):
        start = int(rng.integers(0, n - window + 1))
        left = np.maximum(start - slack, segs[:, 0])
        right = np.minimum(start + window + slack, segs[:, 1])
        keep = (np.clip(right - left, 0, None) / np.maximum(area, 1e-12)) >= trunc_thresh
        keep |= (area == 0) & (left <= right)  # a point event: kept when inside the window
        if keep.any() or len(segs) == 0:
            break
    kept = np.stack((left[keep], right[keep]), 1).astype(np.float32) - start
    return Crop(start, start + window, kept, item.labels[keep])


def batch_targets(crops: Sequence[Crop]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-video segment lists -> padded ``(B, N, 2)`` segments, ``(B, N)`` labels and validity."""
    n = max((len(c.labels) for c in crops), default=0)
    segs = torch.zeros(len(crops), n, 2)
    labels = torch.zeros(len(crops), n, dtype=torch.long)
    valid = torch.zeros(len(crops), n, dtype=torch.bool)
    for i, c in enumerate(crops):
        k = len(c.labels)
        segs[i, :k] = torch.from_numpy(np.asarray(c.segments, dtype=np.float32).reshape(-1, 2))
        labels[i, :k] = torch.from_numpy(c.labels)
        valid[i, :k] = True
    return segs, labels, valid


# the official configs' "unbounded" upper end of the last level
TOP_RANGE = 10000


def auto_regression_ranges(items: Sequence[VideoItem], num_levels: int,
                           max_seq_len: int) -> tuple[tuple[tuple[int, int], ...], list[float]]:
    """Regression ranges (``localize.regression_ranges: auto``) from the training segments; returns the
    ranges and the quantiles they were drawn from.

    The statistic is a segment's half-length on the model's input grid (clipped to ``max_seq_len``, the
    longest crop): what its centre point reaches, the value the target assignment compares with a level's
    range. Level boundaries ``b_1 < ... < b_{L-1}`` are its quantiles at ``k / L``, so each level gets
    an equal share of the segments, rounded to the nearest power of two (in log scale) and then raised
    to at least twice the previous boundary (``b_1`` at least 2): the boundaries stay powers of two,
    strictly increasing, and ``b_k >= 2**k``, the stride of level ``k`` (a segment regressed at a level
    is at least one of its steps long on either side of its centre). Ranges: ``[0, b_1], [b_1, b_2],
    ..., [b_{L-1}, 10000]`` (10000 as the official configs' open end)."""
    lengths = np.concatenate([it.segments[:, 1] - it.segments[:, 0] for it in items])
    if not len(lengths):
        raise ConfigError("localize.regression_ranges: auto needs annotated segments in the training split; "
                          "it has none")
    half = np.minimum(lengths, max_seq_len) / 2
    quantiles = [float(np.quantile(half, k / num_levels)) for k in range(1, num_levels)]
    bounds: list[int] = []
    for q in quantiles:
        nearest = 2 ** int(round(math.log2(max(q, 1.0))))
        bounds.append(max(nearest, 2 * (bounds[-1] if bounds else 1)))
    top = max(TOP_RANGE, 2 * bounds[-1]) if bounds else TOP_RANGE
    edges = [0, *bounds, top]
    return tuple(zip(edges[:-1], edges[1:])), quantiles
