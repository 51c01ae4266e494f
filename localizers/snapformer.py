"""SnapFormer: ActionFormer's backbone and FPN spotting point events (one instant each) with heatmaps.

Per pyramid level, a class heatmap (CenterNet / CornerNet style) and a sub-step offset:
- targets: each event at ``t`` (input-grid steps) marks the cell ``c = round(t / stride)`` of every
  level with a Gaussian ``exp(-(i - c)^2 / (2 sigma^2))`` in that level's cells (``heatmap_sigma``; in
  seconds it grows with the stride, as the cells do), max over the events of a class; the offset
  target at ``c`` is ``t / stride - c``;
- loss: CornerNet's penalty-reduced focal loss (alpha 2, beta 4) over the valid cells, and L1 on the
  offsets at the events' cells, both divided by the running number of events (the loss normaliser);
- inference: the local maxima of each level's heatmap (max-pool of ``peak_window`` cells), the top
  ``pre_nms_topk`` above ``pre_nms_thresh``, at ``(c + offset) * stride``; the peaks of one event found
  at several levels are merged by keeping, per class, the best within ``peak_radius`` steps.

Detections are ``{"label", "score", "timestamp"}`` (seconds); ``localizers.point_map`` scores them.
The training loop, crops, EMA and checkpoints are ActionFormer's (``localizers.train``): this module
provides the same ``build_model`` / ``compute_losses`` / ``video_detections`` entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from localizers.actionformer import ActionFormer, LossNormalizer, collate, video_scores
from localizers.blocks import MaskedConv1D
from localizers.config import LocalizeConfig, ModelConfig, TestConfig, TrainConfig
from localizers.heads import _Trunk

# CornerNet's focal exponents: (1 - p)^ALPHA on the events' cells, (1 - y)^BETA p^ALPHA elsewhere
ALPHA, BETA = 2.0, 4.0
LOG_EPS = math.log(1e-4)


@dataclass
class Outputs:
    logits: torch.Tensor      # (B, P, K) heatmap logits
    offsets: torch.Tensor     # (B, P, 1) sub-cell offset, in cells of each point's level
    mask: torch.Tensor        # (B, P)
    points: torch.Tensor      # (P, 4) [t, range_low, range_high, stride]
    level_lengths: list[int]
    strides: tuple[int, ...]


class OffsetHead(_Trunk):
    """One signed offset per cell (the event's position within it); run_heads' regression slot."""

    def __init__(self, dim: int, head_dim: int, layers: int, kernel: int):
        super().__init__(dim, head_dim, layers, kernel)
        self.offset_head = MaskedConv1D(head_dim, 1, kernel)

    def forward(self, x, pad, gaps, level):  # no per-level scale: ``level`` is not needed
        return self.offset_head(self.trunk(x, pad, gaps), pad)


class SnapFormer(ActionFormer):
    """ActionFormer's backbone, neck and classification head (here the class heatmaps); the regression
    slot holds the one-channel offset head."""

    @staticmethod
    def make_reg_head(cfg: ModelConfig) -> nn.Module:
        return OffsetHead(cfg.embed_dim, cfg.embed_dim, cfg.head_layers, cfg.head_kernel)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> Outputs:
        out = super().forward(feats, mask)
        return Outputs(out.logits, out.offsets, out.mask, out.points, out.level_lengths, self.cfg.strides)


def build_model(cfg: LocalizeConfig | ModelConfig) -> SnapFormer:
    return SnapFormer(cfg.model if isinstance(cfg, LocalizeConfig) else cfg)


def heatmap_targets(level_lengths: list[int], strides: tuple[int, ...], times: torch.Tensor, labels: torch.Tensor,
                    valid: torch.Tensor, num_classes: int, sigma: float):
    """Events ``(B, N)`` at ``times`` (input-grid steps) -> heatmaps ``(B, P, K)``, the offset targets
    ``(B, P)`` and the events' cells ``(B, P)`` (bool), levels concatenated as the model's outputs."""
    b = times.shape[0]
    onehot = F.one_hot(labels, num_classes).to(times.dtype) * valid[..., None]
    heats, offs, cells = [], [], []
    bi, ei = torch.nonzero(valid, as_tuple=True)  # once: every level places the same events
    for n, s in zip(level_lengths, strides):
        pos = times / s
        c = pos.round().clamp(0, n - 1)
        d = torch.arange(n, device=times.device, dtype=times.dtype)[None, None, :] - c[..., None]
        g = torch.exp(-d.square() / (2 * sigma ** 2))                       # (B, N, T_l)
        heats.append((g[..., None] * onehot[:, :, None, :]).amax(1) if times.shape[1] else
                     times.new_zeros(b, n, num_classes))
        off = times.new_zeros(b, n)
        cell = torch.zeros(b, n, dtype=torch.bool, device=times.device)
        ci = c[bi, ei].long()
        off[bi, ci] = (pos - c)[bi, ei]
        cell[bi, ci] = True
        offs.append(off)
        cells.append(cell)
    return torch.cat(heats, 1), torch.cat(offs, 1), torch.cat(cells, 1)


def compute_losses(out: Outputs, segments: torch.Tensor, labels: torch.Tensor, seg_valid: torch.Tensor,
                   normalizer: LossNormalizer, cfg: TrainConfig,
                   all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Penalty-reduced focal loss on the heatmaps + L1 on the offsets; ``segments`` are the events as
    ``[t, t]`` (the crops' layout). ``all_sum`` as in ``localizers.actionformer.compute_losses``."""
    num_classes = out.logits.shape[-1]
    heat, off_t, cell = heatmap_targets(out.level_lengths, out.strides, segments[..., 0].float(), labels, seg_valid,
                                        num_classes, cfg.heatmap_sigma)
    valid = out.mask
    logits = out.logits.float()
    pos = (heat == 1) & valid[..., None]
    num_pos = int(pos.sum())
    norm = normalizer.update(num_pos if all_sum is None else int(all_sum(pos.sum())))
    # log p and log(1 - p) clamped as CenterNet clamps p to [1e-4, 1 - 1e-4]
    log_p = F.logsigmoid(logits).clamp(min=LOG_EPS)
    log_q = F.logsigmoid(-logits).clamp(min=LOG_EPS)
    p = torch.sigmoid(logits)
    pos_loss = -(1 - p).pow(ALPHA) * log_p
    neg_loss = -(1 - heat).pow(BETA) * p.pow(ALPHA) * log_q
    neg = ~pos & valid[..., None]
    cls_loss = (pos_loss * pos).sum() / norm + (neg_loss * neg).sum() / norm
    cells = cell & valid
    if bool(cells.any()):
        reg_loss = F.l1_loss(out.offsets[..., 0].float()[cells], off_t[cells], reduction="sum") / norm
    else:
        reg_loss = 0 * out.offsets.sum()
    return {"cls_loss": cls_loss, "reg_loss": reg_loss, "loss": cls_loss + cfg.offset_loss_weight * reg_loss}


@torch.no_grad()
def decode_video(out: Outputs, index: int, cfg: TestConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Peaks of one video's heatmaps, every level: times on the input grid, scores, class ids (before
    the merge across levels)."""
    probs = video_scores(out, index, cfg)
    offsets = out.offsets[index, :, 0].float()
    k = probs.shape[1]
    times, scores, labels = [], [], []
    start = 0
    for n in out.level_lengths:
        level = probs[start: start + n]
        pooled = F.max_pool1d(level.t()[None], cfg.peak_window, stride=1, padding=cfg.peak_window // 2)[0].t()
        flat = (level * (level == pooled)).reshape(-1)
        keep = torch.nonzero(flat > cfg.pre_nms_thresh).squeeze(1)
        top = torch.argsort(flat[keep], descending=True, stable=True)[: cfg.pre_nms_topk]
        idx = keep[top]
        pt = idx // k + start
        stride = out.points[pt, 3]
        times.append(out.points[pt, 0] + offsets[pt] * stride)
        scores.append(flat[idx])
        labels.append(idx % k)
        start += n
    return torch.cat(times), torch.cat(scores), torch.cat(labels)


def merge_peaks(times: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, radius: float, min_score: float,
                max_num: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class, greedily by score: a peak within ``radius`` steps of a kept one of its class is the
    same event (found at another level) and dropped; at most ``max_num`` kept, in descending score."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] >= min_score]
    kept: list[int] = []
    t, c = times.tolist(), labels.tolist()
    for i in order.tolist():
        if all(c[j] != c[i] or abs(t[j] - t[i]) > radius for j in kept):
            kept.append(i)
            if len(kept) == max_num:
                break
    idx = torch.tensor(kept, dtype=torch.long)
    return times[idx], scores[idx], labels[idx]


@torch.no_grad()
def detect(model: SnapFormer, feats: torch.Tensor, cfg: TestConfig,
           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-video inference of ``(T, C)`` features: event times on the input grid, scores, class ids."""
    batch, mask = collate([feats], model.cfg, training=False)
    out = model(batch.to(device), mask.to(device))
    times, scores, labels = (x.cpu() for x in decode_video(out, 0, cfg))
    return merge_peaks(times, scores, labels, cfg.peak_radius, cfg.min_score, cfg.max_detections)


def video_detections(model: SnapFormer, source, item, cfg: TestConfig, classes: tuple[str, ...],
                     video_scores: dict | None = None, device: torch.device | str = "cpu") -> list[dict]:
    """One video's events, ``{"label", "score", "timestamp"}`` in seconds within the video."""
    from localizers.data import read_features

    if video_scores is not None:
        raise ValueError("SnapFormer labels its events itself: external video scores do not apply")
    times, scores, labels = detect(model, read_features(source, item), cfg, device)
    seconds = item.grid.to_seconds(times.double().numpy()).clip(0.0, item.duration)
    return [{"label": classes[int(c)], "score": float(s), "timestamp": float(t)}
            for t, s, c in zip(seconds.tolist(), scores.tolist(), labels.tolist())]
