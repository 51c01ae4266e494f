"""FPN necks: identity (a LayerNorm per pyramid level, as ActionFormer) or a bidirectional cross-scale
FPN (BiFPN, as TBTFormer); masks passed through."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localizers.blocks import LayerNorm, MaskedConv1D, _max_pool_3_2, pad_mask


class IdentityFPN(nn.Module):
    def __init__(self, dim: int, num_levels: int):
        super().__init__()
        self.fpn_norms = nn.ModuleList(LayerNorm(dim) for _ in range(num_levels))

    def forward(self, feats: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [norm(f) for norm, f in zip(self.fpn_norms, feats)], masks


class _Fuse(nn.Module):
    """Fast normalised fusion of same-length inputs (learned non-negative weights summing to ~1), then
    SiLU, a depthwise-separable conv and LayerNorm (EfficientDet's BiFPN node)."""

    def __init__(self, dim: int, n_inputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_inputs))
        self.depthwise = MaskedConv1D(dim, dim, 3, groups=dim, bias=False)
        self.pointwise = MaskedConv1D(dim, dim, 1)
        self.norm = LayerNorm(dim)

    def forward(self, inputs: list[torch.Tensor], pad: torch.Tensor | None) -> torch.Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + 1e-4)
        x = sum(wi.to(t.dtype) * t for wi, t in zip(w, inputs))
        x = self.norm(self.pointwise(self.depthwise(F.silu(x), pad), pad))
        return x if pad is None else x.masked_fill(pad, 0.0)


class BiFPN(nn.Module):
    """Top-down then bottom-up pathways across the pyramid: each level fuses its backbone map with the
    coarser level's (upsampled 2x, nearest) and then with the finer level's (3/2 max-pooled), so every
    level sees context from all the others; a LayerNorm per level at the end, as the identity neck.
    Level ``l`` has exactly half the steps of level ``l - 1`` (inputs are padded to a multiple of the
    coarsest stride)."""

    def __init__(self, dim: int, num_levels: int):
        super().__init__()
        self.top_down = nn.ModuleList(_Fuse(dim, 2) for _ in range(num_levels - 1))
        self.bottom_up = nn.ModuleList(_Fuse(dim, 3 if level < num_levels - 1 else 2) for level in range(1, num_levels))
        self.fpn_norms = nn.ModuleList(LayerNorm(dim) for _ in range(num_levels))

    def forward(self, feats: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pads = [pad_mask(m) for m in masks]
        n = len(feats)
        td = list(feats)
        for level in range(n - 2, -1, -1):
            up = td[level + 1].repeat_interleave(2, dim=1)[:, : feats[level].shape[1]]
            td[level] = self.top_down[level]([feats[level], up], pads[level])
        out = [td[0]]
        for level in range(1, n):
            down = _max_pool_3_2(out[level - 1])
            inputs = [feats[level], td[level], down] if level < n - 1 else [feats[level], down]
            out.append(self.bottom_up[level - 1](inputs, pads[level]))
        return [norm(f) for norm, f in zip(self.fpn_norms, out)], masks
