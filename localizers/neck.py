"""Identity FPN neck: a LayerNorm per pyramid level, masks passed through."""

from __future__ import annotations

import torch
from torch import nn

from localizers.blocks import LayerNorm


class IdentityFPN(nn.Module):
    def __init__(self, dim: int, num_levels: int):
        super().__init__()
        self.fpn_norms = nn.ModuleList(LayerNorm(dim) for _ in range(num_levels))

    def forward(self, feats: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [norm(f) for norm, f in zip(self.fpn_norms, feats)], masks
