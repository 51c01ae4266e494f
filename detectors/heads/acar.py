"""ACAR-Net's head as published (``ACARHead`` with ``HR2O_NL``, Siyu-C/ACAR-Net).

``conv_reduce`` 1x1 (no bias) on the whole map; RoIAlign 7x7 (legacy, adaptive sampling) + max = actor
vector (1024); per actor [context, actor] tiled -> 1x1 conv + ReLU, valid 3x3 conv + ReLU, max pool 3/2;
HR2O at every spatial position: attention of each actor over the actors of its clip (self included),
GroupNorm(1), ReLU, conv, dropout 0.2, residual (depth 2 for R50; R101: depth 1 with a 1x1 conv); global
average pool; ``fc1`` (no bias) + ReLU on the actor vector, concatenated, ``fc2`` (no bias).

Published code runs HR2O clip by clip, so nothing is padded. Batched here: actors are laid out per clip
(B, S) and ``padding="mask"`` (default, equal to the published per-clip loop and the released weights'
setting of one clip per GPU) keeps padded slots out of the softmax. ``padding="zeros"`` reproduces the
batched variant with zero-padded actors that take part in the softmax with logit 0 and value 0 (ACAR-Net
issue #8: -0.7 mAP at several clips per GPU); there, a clip's prediction depends on its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detectors.heads.base import ClipLayout, Head, HeadInput, masked_softmax, width
from detectors.recipes import Recipe
from detectors.roi_align import actor_vector, roi_align
from pipeline.checkpoints import KeyFormat

# ACAR-Net configs/AVA/SLOWFAST_R50_ACAR_HR2O.yaml as in the paper (32 GPUs x 1 clip): SGD nesterov,
# lr warmed up linearly from 0.008 to 0.064 over 1 epoch, x0.1 at 5.6 and again at 5.8, 6 epochs.
ACAR_R50 = Recipe(optimizer="sgd", lr=0.064, batch_clips=32, epochs=6.0, weight_decay=1e-7, nesterov=True,
                  schedule="steps", milestones=(5.6, 5.8), warmup_epochs=1.0, warmup_start=0.125)


class HR2O(nn.Module):
    """One High-order Relation-to-Object layer (``HR2O_NL``) over the actors of each clip."""

    def __init__(self, dim: int, kernel_size: int, mlp_1x1: bool):
        super().__init__()
        pad = kernel_size // 2
        self.conv_q = nn.Conv2d(dim, dim, kernel_size, padding=pad, bias=False)
        self.conv_k = nn.Conv2d(dim, dim, kernel_size, padding=pad, bias=False)
        self.conv_v = nn.Conv2d(dim, dim, kernel_size, padding=pad, bias=False)
        self.conv = nn.Conv2d(dim, dim, 1 if mlp_1x1 else kernel_size, padding=0 if mlp_1x1 else pad, bias=False)
        self.norm = nn.GroupNorm(1, dim)
        self.dp = nn.Dropout(0.2)
        self.scale = dim ** -0.5

    def forward(self, x: torch.Tensor, layout: ClipLayout, key_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (layout.pad(conv(x)) for conv in (self.conv_q, self.conv_k, self.conv_v))  # (B,S,C,h,w)
        att = torch.einsum("bichw,bjchw->bijhw", q, k) * self.scale
        mask = None if key_mask is None else key_mask[:, None, :, None, None]
        att = masked_softmax(att, mask, dim=2)
        virt = layout.unpad(torch.einsum("bijhw,bjchw->bichw", att, v))
        virt = self.dp(self.conv(F.relu(self.norm(virt))))
        return x + virt


class ACARHead(Head):
    recipe = ACAR_R50
    released = (KeyFormat("ACAR-Net", drop=(r"backbone\.",), prefixes=("head.module.",)),)
    released_file = "ACAR-Net AVA_SLOWFAST_R50_ACAR_HR2O.pth.tar (Siyu-C/ACAR-Net model zoo)"
    released_input = ("conv_reduce.weight", 1, 1)

    def __init__(self, in_channels: int = 2304, num_classes: int = 60, reduce_dim: int | None = None,
                 hidden_dim: int | None = None, depth: int = 2, kernel_size: int = 3, mlp_1x1: bool = False,
                 roi_size: int = 7, dropout: float = 0.0, bias: bool = False, padding: str = "mask",
                 loss: str = "pose_softmax", num_pose: int = 13):
        super().__init__(loss, num_classes, num_pose=num_pose)
        if padding not in ("mask", "zeros"):
            raise ValueError(f"acar: padding must be mask or zeros, got {padding!r}")
        self.roi_size, self.padding = roi_size, padding
        reduce_dim, hidden_dim = width(1024, in_channels, reduce_dim), width(512, in_channels, hidden_dim)
        self.conv_reduce = nn.Conv2d(in_channels, reduce_dim, 1, bias=False)
        self.conv1 = nn.Conv2d(reduce_dim * 2, hidden_dim, 1, bias=False)
        self.conv2 = nn.Conv2d(hidden_dim, hidden_dim, 3, bias=False)
        self.hr2o = nn.ModuleList(HR2O(hidden_dim, kernel_size, mlp_1x1) for _ in range(depth))
        self.fc1 = nn.Linear(reduce_dim, hidden_dim, bias=False)
        self.dp = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim * 2, num_classes, bias=bias)
        self.reduce_dim = reduce_dim

    def forward(self, batch: HeadInput) -> torch.Tensor:
        feats = self.conv_reduce(batch.maps.to(self.fc1.weight.dtype))          # (B, 1024, H, W)
        actor = actor_vector(roi_align(feats, batch.pixel_rois(), self.roi_size,
                                       1.0 / batch.feature_stride, -1, False))   # (R, 1024)
        # conv1 on [context, actor]: the context half once per clip, the actor half once per actor
        w = self.conv1.weight.flatten(1)
        x = F.conv2d(feats, w[:, :self.reduce_dim, None, None])[batch.clip_index]
        x = F.relu(x + (actor @ w[:, self.reduce_dim:].t())[:, :, None, None])
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        layout = ClipLayout.of(batch.clip_index, batch.num_clips)
        key_mask = layout.mask if self.padding == "mask" else None
        for layer in self.hr2o:
            x = layer(x, layout, key_mask)
        relation = x.mean(dim=(-2, -1))
        out = torch.cat([F.relu(self.fc1(actor)), relation], dim=1)
        return self.fc2(self.dp(out))
