"""ACRN as published in mmaction2 (``ACRNHead`` shared head + ``BBoxHeadAVA``).

RoIAlign 8x8 (aligned, adaptive sampling, stride 16) -> spatial max = actor vector; the actor vector
tiled over the whole keyframe map and concatenated [actor, context]; 1x1 conv + BN + ReLU, (1,3,3) conv
+ BN + ReLU: one relation map per actor; dropout, spatial max, linear classifier. Column 0 of the
published classifier is the background class, which the logits leave out.

The 1x1 conv over [actor, context] is computed as W_actor @ actor + W_context @ map: the context half
runs once per clip instead of once per actor (same function, far fewer FLOPs). Convs keep the
published Conv3d shapes (time axis of size 1) so released weights load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detectors.heads.base import Head, HeadInput, width
from detectors.heads.roi_linear import MMACTION2_AVA
from detectors.roi_align import actor_vector, roi_align
from pipeline.checkpoints import KeyFormat


class ConvBN(nn.Module):
    """mmcv ``ConvModule`` names (``conv``, ``bn``) for one Conv3d + BatchNorm3d + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int]):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, padding=(0, kernel[1] // 2, kernel[2] // 2), bias=False)
        self.bn = nn.BatchNorm3d(cout)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")


class ACRNHead(Head):
    recipe = MMACTION2_AVA
    released = (KeyFormat("mmaction2 ACRN", drop=(r"backbone\.",),
                          prefixes=("roi_head.shared_head.", "roi_head.bbox_head.")),)
    released_file = ("mmaction2 slowfast-acrn_kinetics400-pretrained-r50_8xb8-8x8x1-cosine-10e_ava21-rgb "
                     "checkpoint (download.openmmlab.com)")
    released_input = ("conv1.conv.weight", 1, 2)  # the 1x1 conv over [actor, context]

    def __init__(self, in_channels: int = 2304, num_classes: int = 80, hidden: int | None = None,
                 roi_size: int = 8, aligned: bool = True, sampling_ratio: int = 0, dropout: float = 0.5,
                 background_class: bool = True, loss: str = "bce", num_pose: int = 13):
        super().__init__(loss, num_classes, num_pose=num_pose)
        self.roi_size, self.aligned, self.sampling_ratio = roi_size, aligned, sampling_ratio
        self.in_channels = in_channels
        self.background = int(background_class)
        hidden = width(2304, in_channels, hidden)
        self.conv1 = ConvBN(2 * in_channels, hidden, (1, 1, 1))
        self.conv2 = ConvBN(hidden, hidden, (1, 3, 3))
        self.dropout = nn.Dropout(dropout)
        self.fc_cls = nn.Linear(hidden, num_classes + self.background)
        nn.init.xavier_uniform_(self.fc_cls.weight)
        nn.init.zeros_(self.fc_cls.bias)

    def forward(self, batch: HeadInput) -> torch.Tensor:
        maps = batch.maps.to(self.fc_cls.weight.dtype)
        pooled = roi_align(maps, batch.pixel_rois(), self.roi_size, 1.0 / batch.feature_stride,
                           self.sampling_ratio, self.aligned)
        actor = actor_vector(pooled)                                   # (R, C)
        weight = self.conv1.conv.weight.flatten(1)                     # (hidden, 2C): [actor, context]
        w_actor, w_context = weight[:, :self.in_channels], weight[:, self.in_channels:]
        context = F.conv2d(maps, w_context[:, :, None, None])          # (B, hidden, H, W)
        x = context[batch.clip_index] + (actor @ w_actor.t())[:, :, None, None]
        x = F.relu(self.conv1.bn(x.unsqueeze(2)))
        x = F.relu(self.conv2.bn(self.conv2.conv(x)))                 # (R, hidden, 1, H, W)
        x = self.dropout(x).mean(dim=2).amax(dim=(-2, -1))            # temporal avg, spatial max
        return self.fc_cls(x)[:, self.background:]
