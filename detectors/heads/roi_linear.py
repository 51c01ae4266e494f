"""The linear RoI baseline (mmaction2's SlowFast AVA detector without a relation head): RoIAlign on the
keyframe map, then mmaction2 ``BBoxHeadAVA``: dropout (before pooling, as published), spatial max pool to
the actor vector, one linear classifier."""

from __future__ import annotations

import torch
from torch import nn

from detectors.heads.base import Head, HeadInput
from detectors.recipes import Recipe
from detectors.roi_align import actor_vector, roi_align

# mmaction2's AVA SlowFast recipe (the ACRN config's optimiser and schedule): SGD 0.1 for 8 GPUs x 8 clips,
# linear warm-up from x0.1 over 2 epochs, cosine to 10 epochs, grad-norm clip 40, wd on every parameter.
MMACTION2_AVA = Recipe(optimizer="sgd", lr=0.1, batch_clips=64, epochs=10.0, weight_decay=1e-5,
                       schedule="cosine", warmup_epochs=2.0, warmup_start=0.1, grad_clip=40.0)


class RoILinearHead(Head):
    recipe = MMACTION2_AVA

    def __init__(self, in_channels: int = 2304, num_classes: int = 80, roi_size: int = 8,
                 aligned: bool = True, sampling_ratio: int = 0, dropout: float = 0.5,
                 loss: str = "bce", num_pose: int = 13):
        super().__init__(loss, num_classes, num_pose=num_pose)
        self.roi_size, self.aligned, self.sampling_ratio = roi_size, aligned, sampling_ratio
        self.dropout = nn.Dropout(dropout)
        self.fc_cls = nn.Linear(in_channels, num_classes)

    def forward(self, batch: HeadInput) -> torch.Tensor:
        maps = batch.maps.to(self.fc_cls.weight.dtype)
        pooled = roi_align(maps, batch.pixel_rois(), self.roi_size, 1.0 / batch.feature_stride,
                           self.sampling_ratio, self.aligned)
        return self.fc_cls(actor_vector(self.dropout(pooled)))
