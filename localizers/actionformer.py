"""ActionFormer (Zhang, Wu, Li, ECCV 2022): the model, its training loss and its inference.

Layout: features ``(B, T, C)`` channels-last with a boolean mask ``(B, T)``; per-point outputs are
concatenated over the pyramid levels, ``P = sum_l T / 2^l`` points, with ``points`` ``(P, 4)``
``[t, range_low, range_high, stride]`` on the input feature grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from localizers.assign import assign_targets
from localizers.backbone import ConvTransformerBackbone
from localizers.config import LocalizeConfig, ModelConfig, TestConfig, TrainConfig
from localizers.heads import ClsHead, RegHead, run_heads
from localizers.losses import (distribution_focal_loss, iou_loss_1d, offsets_iou, quality_focal_loss,
                               sigmoid_focal_loss)
from localizers.neck import BiFPN, IdentityFPN
from localizers.points import make_points


@dataclass
class Outputs:
    logits: torch.Tensor      # (B, P, K)
    offsets: torch.Tensor     # (B, P, 2), in strides of each point's level
    mask: torch.Tensor        # (B, P)
    points: torch.Tensor      # (P, 4)
    level_lengths: list[int]
    # TBTFormer: logits of each boundary's distance distribution (B, P, 2, reg_max + 1); offsets are
    # its expectation
    boundary_logits: torch.Tensor | None = None


class ActionFormer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.input_dim == "auto" or cfg.num_classes == "auto":
            raise ValueError("build the model from a config whose input_dim / num_classes are resolved")
        self.cfg = cfg
        self.backbone = ConvTransformerBackbone(cfg)
        fpn = IdentityFPN if cfg.fpn == "identity" else BiFPN
        self.neck = fpn(cfg.embed_dim, cfg.num_levels)
        self.cls_head = ClsHead(cfg.embed_dim, cfg.embed_dim, cfg.num_classes, cfg.head_layers, cfg.head_kernel,
                                cfg.cls_prior_prob)
        self.reg_head = self.make_reg_head(cfg)

    @staticmethod
    def make_reg_head(cfg: ModelConfig) -> nn.Module:
        return RegHead(cfg.embed_dim, cfg.embed_dim, cfg.num_levels, cfg.head_layers, cfg.head_kernel)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor, regress_at: torch.Tensor | None = None) -> Outputs:
        """``regress_at`` (training, :func:`regressed_points`): offsets at those points only, zero elsewhere."""
        levels, masks = self.backbone(feats, mask)
        levels, masks = self.neck(levels, masks)
        logits, offsets, out_mask = run_heads(self.cls_head, self.reg_head, levels, masks, regress_at)
        lengths = [f.shape[1] for f in levels]
        points = make_points(lengths, self.cfg.strides, self.cfg.regression_ranges, feats.device)
        return Outputs(logits, offsets, out_mask, points, lengths)


def build_model(cfg: LocalizeConfig | ModelConfig) -> ActionFormer:
    return ActionFormer(cfg.model if isinstance(cfg, LocalizeConfig) else cfg)


def padded_length(lengths: list[int], cfg: ModelConfig, training: bool) -> int:
    """Length a batch is padded to.

    Shorter than max_seq_len: the official model pads to max_seq_len. Outputs at valid steps depend on
    the padding only through whether each level has at least one padded step after the video (the
    padded steps all hold the same values), so the shortest length that keeps one at every level gives
    the same numbers with less work: ``T = s * ceil(L / s) + 1`` for the coarsest stride ``s``, whose
    levels, halved rounding up as the strided layers do, have ``ceil(T / 2^l) >= ceil(L / 2^l) + 1``
    steps (at most max_seq_len, where the official model has no padded step either). Longer (inference
    only): the next multiple of max_div_factor, as the official model.
    """
    top = cfg.strides[-1]
    longest = max(lengths)
    if longest <= cfg.max_seq_len:
        return min(cfg.max_seq_len, -(-longest // top) * top + 1)
    if training:
        raise ValueError(f"training input of {longest} steps exceeds max_seq_len {cfg.max_seq_len}")
    div = cfg.max_div_factor
    return -(-longest // div) * div


def collate(feats: list[torch.Tensor], cfg: ModelConfig, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(T_i, C)]`` -> zero-padded ``(B, T, C)`` and mask ``(B, T)``."""
    lengths = [f.shape[0] for f in feats]
    t = padded_length(lengths, cfg, training)
    batch = feats[0].new_zeros(len(feats), t, feats[0].shape[1])
    for i, f in enumerate(feats):
        batch[i, : f.shape[0]] = f
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return batch, mask


def regressed_points(cfg: ModelConfig, length: int, segments: torch.Tensor, labels: torch.Tensor,
                     seg_valid: torch.Tensor, radius: float) -> torch.Tensor:
    """Bool ``(B, P)``: the points of a training batch padded to ``length`` steps whose offsets
    :func:`compute_losses` reads (the positives of the assignment, padding aside). Known before the
    forward: the model's ``regress_at``."""
    points = make_points([-(-length // s) for s in cfg.strides], cfg.strides, cfg.regression_ranges, segments.device)
    cls_t, _ = assign_targets(points, segments, labels, seg_valid, cfg.num_classes, radius)
    return cls_t.sum(-1) > 0


class LossNormalizer:
    """Running average of the number of positives (momentum), the loss denominator; part of the
    training state (checkpointed)."""

    def __init__(self, init: float, momentum: float):
        self.value = float(init)
        self.momentum = momentum

    def state_dict(self) -> float:
        return self.value

    def load_state_dict(self, value: float) -> None:
        self.value = value

    def update(self, num_pos: int) -> float:
        self.value = self.momentum * self.value + (1 - self.momentum) * max(num_pos, 1)
        return self.value


def compute_losses(out: Outputs, segments: torch.Tensor, labels: torch.Tensor, seg_valid: torch.Tensor,
                   normalizer: LossNormalizer, cfg: TrainConfig,
                   all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Focal (or quality focal) + IoU loss of a batch (+ the distribution focal loss of a TBTFormer), each
    divided by the running number of positives.

    ``all_sum`` (data-parallel training: a sum over the processes, each holding a slice of the batch): the
    positives counted, and the adaptive regression weight computed, over the whole batch, so that the
    batch's loss is the sum of the processes' losses, as one process would compute it."""
    num_classes = out.logits.shape[-1]
    cls_t, reg_t = assign_targets(out.points, segments, labels, seg_valid, num_classes, cfg.center_radius)
    valid = out.mask
    pos = (cls_t.sum(-1) > 0) & valid
    num_pos = int(pos.sum())
    norm = normalizer.update(num_pos if all_sum is None else int(all_sum(pos.sum())))
    target = cls_t
    if cfg.label_smoothing > 0:
        target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / (num_classes + 1)
    if cfg.cls_loss == "qfl":
        # IoU-aware classification: a positive's target is how well its segment fits (no gradient
        # through the target), so the score ranks segments by their localisation quality
        quality = torch.zeros_like(pos, dtype=target.dtype)
        quality[pos] = offsets_iou(out.offsets[pos].detach(), reg_t[pos]).to(target.dtype)
        focal = quality_focal_loss(out.logits.float(), target * quality[..., None], cfg.focal_gamma)
    else:
        focal = sigmoid_focal_loss(out.logits.float(), target, cfg.focal_alpha, cfg.focal_gamma)
    cls_loss = (focal * valid[..., None]).sum() / norm
    dfl = None
    if num_pos == 0:
        reg_loss = 0 * out.offsets.sum()
        if out.boundary_logits is not None:
            dfl = 0 * out.boundary_logits.sum()
    else:
        reg_loss = iou_loss_1d(out.offsets[pos], reg_t[pos], cfg.reg_loss).sum() / norm
        if out.boundary_logits is not None:
            dfl = distribution_focal_loss(out.boundary_logits[pos], reg_t[pos]).sum() / norm
    weight = cfg.reg_loss_weight
    if weight <= 0:
        parts = torch.stack((cls_loss.detach().float(), reg_loss.detach().float()))
        if all_sum is not None:
            parts = all_sum(parts)
        weight = parts[0] / max(parts[1].item(), 0.01)
    losses = {"cls_loss": cls_loss, "reg_loss": reg_loss, "loss": cls_loss + weight * reg_loss}
    if dfl is not None:
        losses["dfl_loss"] = dfl
        losses["loss"] = losses["loss"] + cfg.dfl_weight * dfl
    return losses


@torch.no_grad()
def video_scores(out: Outputs, index: int, cfg: TestConfig) -> torch.Tensor:
    """``(P, K)`` class scores of one video's points, ``sigmoid(logit / score_temperature)``, 0 at padding."""
    logits = out.logits[index].float()
    if cfg.score_temperature != 1.0:
        logits = logits / cfg.score_temperature
    return torch.sigmoid(logits) * out.mask[index, :, None]


def decode_video(out: Outputs, index: int, cfg: TestConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates of one video before NMS: per level, points scoring above pre_nms_thresh, the top
    pre_nms_topk of them, lasting more than duration_thresh (and at most max_duration); segments on the
    input grid, scores (``sigmoid(logit / score_temperature)``), class ids."""
    probs = video_scores(out, index, cfg)
    offsets = out.offsets[index].float()
    k = probs.shape[1]
    segs, scores, labels = [], [], []
    start = 0
    for n in out.level_lengths:
        flat = probs[start: start + n].reshape(-1)
        keep = torch.nonzero(flat > cfg.pre_nms_thresh).squeeze(1)
        top = torch.argsort(flat[keep], descending=True, stable=True)[: cfg.pre_nms_topk]
        idx = keep[top]
        pt = idx // k + start
        pts = out.points[pt]
        off = offsets[pt]
        seg = torch.stack((pts[:, 0] - off[:, 0] * pts[:, 3], pts[:, 0] + off[:, 1] * pts[:, 3]), -1)
        long_enough = (seg[:, 1] - seg[:, 0]) > cfg.duration_thresh
        if cfg.max_duration is not None:
            long_enough &= (seg[:, 1] - seg[:, 0]) <= cfg.max_duration
        segs.append(seg[long_enough])
        scores.append(flat[idx][long_enough])
        labels.append((idx % k)[long_enough])
        start += n
    return torch.cat(segs), torch.cat(scores), torch.cat(labels)


@torch.no_grad()
def detect(model: ActionFormer, feats: torch.Tensor, cfg: TestConfig,
           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-video inference (no crop) of ``(T, C)`` features: segments on the input feature grid
    after per-class NMS and the minimum gap per class, their scores and class ids (CPU tensors,
    descending score)."""
    from localizers.nms import batched_nms

    batch, mask = collate([feats], model.cfg, training=False)
    out = model(batch.to(device), mask.to(device))
    segs, scores, labels = (x.cpu() for x in decode_video(out, 0, cfg))
    gaps = None
    if any(g > 0 for g in cfg.min_gap):
        gaps = torch.tensor(cfg.min_gap * (model.cfg.num_classes if len(cfg.min_gap) == 1 else 1))
    if cfg.nms_method == "none" and gaps is None:
        order = torch.argsort(scores, descending=True)[: cfg.max_detections]
        return segs[order], scores[order], labels[order]
    sigma = cfg.nms_sigma if cfg.class_nms_sigma is None else torch.tensor(cfg.class_nms_sigma)
    return batched_nms(segs, scores, labels, iou_threshold=cfg.iou_threshold, sigma=sigma,
                       method=cfg.nms_method, min_score=cfg.min_score, max_num=cfg.max_detections, min_gap=gaps)


def video_detections(model: ActionFormer, source, item, cfg: TestConfig, classes: tuple[str, ...],
                     video_scores: dict | None = None, device: torch.device | str = "cpu") -> list[dict]:
    """One video's detections in the ActivityNet submission format (seconds, clipped to the video):
    :func:`detect` on the features of ``item`` (a ``localizers.data.VideoItem``) read from ``source``,
    labelled by the model, or, with ``video_scores`` (:func:`load_video_scores`) for a class-agnostic
    model, by the video's top external classes."""
    from localizers.data import read_features

    segs, scores, labels = detect(model, read_features(source, item), cfg, device)
    seconds = item.grid.to_seconds(segs.double().numpy()).clip(0.0, item.duration)
    dets = [{"label": classes[int(c)] if video_scores is None else "", "score": float(s),
             "segment": [float(a), float(b)]}
            for (a, b), s, c in zip(seconds, scores.tolist(), labels.tolist())]
    if video_scores is None:
        return dets
    return fuse_video_scores(dets, video_scores.get(item.id), classes, cfg.ext_score_topk, cfg.max_detections)

def load_video_scores(path: str, classes: tuple[str, ...]) -> dict:
    """Video-level class scores, ``{video: np.ndarray over classes}``, from a JSON file
    ``{"results": {video: [score per class]}, "class": [names]}`` (the CUHK ActivityNet file the official
    recipe fuses) or ``{video: {class name: score}}``."""
    import json

    import numpy as np

    from pipeline.errors import ConfigError

    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"localize.ext_score_file: cannot read {path}: {e}") from None
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    if "results" in obj and "class" in obj:
        order = [index.get(c) for c in obj["class"]]
        for vid, scores in obj["results"].items():
            row = np.zeros(len(classes))
            for j, s in zip(order, scores):
                if j is not None:
                    row[j] = s
            out[vid] = row
        return out
    for vid, by_name in obj.items():
        row = np.zeros(len(classes))
        for name, s in by_name.items():
            if name not in index:
                raise ConfigError(f"localize.ext_score_file: {path}: video {vid}: unknown class {name!r}")
            row[index[name]] = s
        out[vid] = row
    return out


def fuse_video_scores(dets: list[dict], video_scores, classes: tuple[str, ...], topk: int,
                      max_detections: int) -> list[dict]:
    """Label class-agnostic detections with the video's top-k external classes, score x class score."""
    if video_scores is None:
        return []
    top = sorted(range(len(video_scores)), key=lambda c: -video_scores[c])[:topk]
    fused = [{"label": classes[c], "score": d["score"] * float(video_scores[c]), "segment": d["segment"]}
             for d in dets for c in top]
    fused.sort(key=lambda d: -d["score"])
    return fused[:max_detections]
