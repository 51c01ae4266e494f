"""Training and evaluation data of the detect stages: the keyframes of a split that the keyframe store
holds, their boxes and multi-hot targets (built once), and batches of several clips with a variable
number of actors each (maps padded to the largest in the batch; box jitter applied per step on the
cached map, never on pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.ava import AvaSplit, keyframe_id
from pipeline.boxes import box_iou

IN_MEMORY_BYTES = 2 << 30  # hold every map of a split in memory below this (float16 as stored)


@dataclass(frozen=True)
class Keyframe:
    """One keyframe's actors: boxes (N, 4) normalised xyxy, targets (N, K) multi-hot over the label map's
    ids in sorted order, box scores (N,) (1 for ground truth)."""

    video: str
    timestamp: int
    boxes: np.ndarray
    targets: np.ndarray
    scores: np.ndarray

    @property
    def rid(self) -> str:
        return keyframe_id(self.video, self.timestamp)


def class_ids(labelmap: dict[int, str]) -> tuple[int, ...]:
    return tuple(sorted(labelmap))


def _multi_hot(labels: Sequence[Sequence[int]], column: dict[int, int]) -> np.ndarray:
    out = np.zeros((len(labels), len(column)), np.float32)
    for row, ids in enumerate(labels):
        out[row, [column[i] for i in ids if i in column]] = 1.0
    return out


def training_keyframes(split: AvaSplit, stored: set[str], source: str, min_score: float,
                       log: Callable[[str], None]) -> list[Keyframe]:
    """Keyframes with at least one box: ground truth (``source='gt'``), or the proposals at or above
    ``min_score`` labelled by their best ground truth at IoU >= 0.5 (else all-negative), with the
    ground-truth boxes added as mmaction2 does (``'proposals'``)."""
    column = {i: c for c, i in enumerate(class_ids(split.labelmap))}
    out, missing = [], 0
    for (video, ts), gt in sorted(split.gt.items()):
        if keyframe_id(video, ts) not in stored:
            missing += 1
            continue
        boxes, targets = gt.boxes, _multi_hot(gt.labels, column)
        if source == "proposals" and split.proposals is not None and (video, ts) in split.proposals:
            props = split.proposals[(video, ts)]
            props = props[props[:, 4] >= min_score, :4]
            if len(props) and len(boxes):
                iou = box_iou(props, boxes)
                best = iou.argmax(1)
                prop_targets = targets[best] * (iou.max(1) >= 0.5)[:, None]
                boxes = np.concatenate([boxes, props]).astype(np.float32)
                targets = np.concatenate([targets, prop_targets])
        if len(boxes):
            out.append(Keyframe(video, ts, boxes, targets, np.ones(len(boxes), np.float32)))
    if missing:
        log(f"detect: {missing} annotated keyframes of {split.name} are not in the keyframe store; skipped")
    return out


def eval_keyframes(split: AvaSplit, stored: set[str], source: str, min_score: float,
                   log: Callable[[str], None]) -> list[Keyframe]:
    """Every keyframe of the split in the store with the boxes to score: proposals at or above
    ``min_score`` (when the split has proposals and ``source='proposals'``), else ground truth."""
    use_proposals = source == "proposals" and split.proposals is not None
    n_classes = len(split.labelmap)
    out, missing = [], 0
    for video, stamps in sorted(split.keyframes.items()):
        for ts in stamps:
            if keyframe_id(video, ts) not in stored:
                missing += 1
                continue
            if use_proposals:
                props = split.proposals.get((video, ts), np.zeros((0, 5), np.float32))
                props = props[props[:, 4] >= min_score]
                boxes, scores = props[:, :4], props[:, 4]
            else:
                gt = split.gt.get((video, ts))
                boxes = gt.boxes if gt is not None else np.zeros((0, 4), np.float32)
                scores = np.ones(len(boxes), np.float32)
            if len(boxes):
                out.append(Keyframe(video, ts, boxes.astype(np.float32), np.zeros((len(boxes), n_classes),
                                                                                  np.float32), scores))
    if missing:
        log(f"detect_eval: {missing} keyframes of {split.name} are not in the keyframe store; skipped")
    return out


class MapSource:
    """Cached maps and context tokens by keyframe id, read through ``reader`` (a ``RecordReader`` of the
    keyframe store): once into memory (float16 as stored) when the records fit in ``IN_MEMORY_BYTES``,
    else from the store per batch."""

    def __init__(self, reader, rids: Sequence[str]):
        self.reader = reader
        self.feature_stride = int(reader.attrs["feature_stride"])
        self._memory: dict[str, tuple] | None = None
        first = self._load(rids[0]) if rids else None
        per_record = sum(t.numel() * 2 for t in first[:2]) if first else 0
        if per_record * len(rids) <= IN_MEMORY_BYTES:
            self._memory = {rid: first if i == 0 else self._load(rid) for i, rid in enumerate(rids)}

    def _load(self, rid: str) -> tuple:
        rec = self.reader.read(rid, raw=True)
        attrs = rec["attrs"]
        return (torch.from_numpy(np.ascontiguousarray(rec["map"])),
                torch.from_numpy(np.ascontiguousarray(rec["context"])),
                (int(attrs["frame_height"]), int(attrs["frame_width"])))

    def get(self, rid: str) -> tuple:
        return self._memory[rid] if self._memory is not None else self._load(rid)


def jitter_boxes(boxes: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Each side moved by U(-amount, amount) x the box's width or height, clipped to [0, 1]."""
    if amount <= 0 or not len(boxes):
        return boxes
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = torch.rand(boxes.shape, generator=generator, dtype=boxes.dtype) * 2 - 1
    moved = (boxes + noise * amount * wh).clamp(0, 1)
    # a box jittered inside out keeps its original coordinates
    ok = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])
    return torch.where(ok[:, None], moved, boxes)


def collate(keyframes: Sequence[Keyframe], source: MapSource, jitter: float = 0.0,
            generator: torch.Generator | None = None):
    """A ``HeadInput`` of several clips (maps zero-padded to the largest, normalised boxes, each actor's
    clip index) and the (R, K) targets."""
    from detectors.heads import HeadInput

    loaded = [source.get(k.rid) for k in keyframes]
    c = loaded[0][0].shape[0]
    h = max(m.shape[1] for m, _, _ in loaded)
    w = max(m.shape[2] for m, _, _ in loaded)
    maps = torch.zeros(len(loaded), c, h, w)
    for i, (m, _, _) in enumerate(loaded):
        maps[i, :, :m.shape[1], :m.shape[2]] = m
    t = max(ctx.shape[1] for _, ctx, _ in loaded)
    context = torch.zeros(len(loaded), c, t)
    for i, (_, ctx, _) in enumerate(loaded):
        context[i, :, :ctx.shape[1]] = ctx
    counts = torch.tensor([len(k.boxes) for k in keyframes])
    boxes = torch.from_numpy(np.concatenate([k.boxes for k in keyframes]))
    if jitter > 0:
        boxes = jitter_boxes(boxes, jitter, generator)
    clip_index = torch.repeat_interleave(torch.arange(len(keyframes)), counts)
    rois = torch.cat([clip_index[:, None].to(boxes.dtype), boxes], 1)
    image_size = torch.tensor([size for _, _, size in loaded], dtype=torch.float32)
    batch = HeadInput(maps=maps, context=context, rois=rois, image_size=image_size, clip_index=clip_index,
                      feature_stride=source.feature_stride)
    targets = torch.from_numpy(np.concatenate([k.targets for k in keyframes]))
    return batch, targets
