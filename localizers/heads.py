"""Classification and regression heads, shared across pyramid levels.

All levels go through each shared convolution in ONE call: the level maps are concatenated along time
with zero gap rows between them, so a kernel never sees a neighbouring level (the gap rows are zeroed
again after every layer, as a level's own zero padding). Outputs come back concatenated over levels
without the gaps: ``(B, sum T_l, K)``. The two heads are attributes of the model itself so the
parameter names are the official ones (``cls_head.head.0.conv.weight``, ``reg_head.scale.0.scale``).

In training the regression loss reads the offsets of the positive points only (a few per action), so
the regression head may run on those alone (``regress_at``): each point with the rows its stacked
convolutions see (its receptive field), as a batch of short windows, the same numbers at a tenth of
the head's cost on THUMOS-like crops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from localizers.blocks import LayerNorm, MaskedConv1D, Scale


def concat_levels(feats: list[torch.Tensor], masks: list[torch.Tensor], gap: int):
    """Levels -> one ``(B, sum T_l + gaps, C)`` tensor, its mask, the row index of each level's rows."""
    b, _, c = feats[0].shape
    pad = feats[0].new_zeros(b, gap, c)
    mpad = masks[0].new_zeros(b, gap)
    x = torch.cat([t for f in feats for t in (f, pad)][:-1], 1)
    m = torch.cat([t for mk in masks for t in (mk, mpad)][:-1], 1)
    rows, start = [], 0
    for f in feats:
        rows.append(torch.arange(start, start + f.shape[1], device=x.device))
        start += f.shape[1] + gap
    return x, m, torch.cat(rows)


class _Trunk(nn.Module):
    """``layers - 1`` masked convs, each followed by LayerNorm and ReLU."""

    def __init__(self, dim: int, head_dim: int, layers: int, kernel: int):
        super().__init__()
        self.head = nn.ModuleList(
            MaskedConv1D(dim if i == 0 else head_dim, head_dim, kernel, bias=False) for i in range(layers - 1))
        self.norm = nn.ModuleList(LayerNorm(head_dim) for _ in range(layers - 1))

    def trunk(self, x: torch.Tensor, pad: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.head, self.norm):
            x = F.relu(norm(conv(x, pad))).masked_fill(gaps, 0.0)
        return x


class ClsHead(_Trunk):
    def __init__(self, dim: int, head_dim: int, num_classes: int, layers: int = 3, kernel: int = 3,
                 prior_prob: float = 0.01):
        super().__init__(dim, head_dim, layers, kernel)
        self.cls_head = MaskedConv1D(head_dim, num_classes, kernel)
        # focal-loss prior: every class starts at probability prior_prob
        nn.init.constant_(self.cls_head.conv.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, x: torch.Tensor, pad: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        return self.cls_head(self.trunk(x, pad, gaps), pad)


class RegHead(_Trunk):
    """Offsets ``(left, right)`` (ReLU'd, >= 0), or with ``out_channels`` / ``activation=False`` raw
    outputs (TBTFormer's boundary distribution logits); scaled per level either way."""

    def __init__(self, dim: int, head_dim: int, num_levels: int, layers: int = 3, kernel: int = 3,
                 out_channels: int = 2, activation: bool = True):
        super().__init__(dim, head_dim, layers, kernel)
        self.scale = nn.ModuleList(Scale() for _ in range(num_levels))
        self.offset_head = MaskedConv1D(head_dim, out_channels, kernel)
        self.activation = activation

    def forward(self, x: torch.Tensor, pad: torch.Tensor, gaps: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """``level``: the pyramid level of each row (broadcast over ``x``'s leading dims), whose Scale
        multiplies the row's offsets."""
        out = self.offset_head(self.trunk(x, pad, gaps), pad)
        scale = torch.stack([s.scale for s in self.scale])[level]
        out = out * scale[..., None].to(out.dtype)
        return F.relu(out) if self.activation else out


def run_heads(cls_head: ClsHead, reg_head: RegHead, feats: list[torch.Tensor], masks: list[torch.Tensor],
              regress_at: torch.Tensor | None = None):
    """Both heads over all levels at once: logits ``(B, P, K)``, offsets ``(B, P, 2)`` and mask ``(B, P)``,
    ``P = sum T_l``. ``regress_at`` (bool ``(B, P)``): the offsets are computed at those points only
    (zero elsewhere)."""
    gap = cls_head.cls_head.pad
    x, m, rows = concat_levels(feats, masks, gap)
    pad = ~m.unsqueeze(-1)
    gaps = torch.ones(x.shape[1], 1, dtype=torch.bool, device=x.device)
    gaps[rows] = False
    logits = cls_head(x, pad, gaps)[:, rows]
    lengths = torch.tensor([f.shape[1] for f in feats], device=x.device)
    if regress_at is None:
        # each level's rows and the gap after them
        # output_size: no device sync to learn the length
        level = torch.repeat_interleave(torch.arange(len(feats), device=x.device), lengths + gap,
                                        output_size=x.shape[1] + gap)[: x.shape[1]]
        offsets = reg_head(x, pad, gaps, level)[:, rows]
    else:
        offsets = _regress_at(reg_head, x, pad, gaps, rows, lengths, regress_at)
    return logits, offsets, m[:, rows]


def _regress_at(reg_head: RegHead, x: torch.Tensor, pad: torch.Tensor, gaps: torch.Tensor, rows: torch.Tensor,
                lengths: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The regression head at the points ``where`` only: each point's row with the ``r`` rows either
    side that its ``r`` stacked convolutions (kernel 3) read, as a batch of ``2r + 1``-row windows.
    Rows past either end of the sequence become gap rows (zero after every layer, as the convolutions'
    own zero padding), so the centre row of each window is the full head's value there."""
    b, p = where.shape
    if not bool(where.any()):  # still one point, so that every parameter takes part (DDP's reducer)
        where = where.clone()
        where[0, 0] = True
    r = (len(reg_head.head) + 1) * reg_head.offset_head.pad
    batch, point = where.nonzero(as_tuple=True)
    span = rows[point][:, None] + torch.arange(-r, r + 1, device=x.device)       # (N, 2r + 1)
    outside = (span < 0) | (span >= x.shape[1])
    span = span.clamp(0, x.shape[1] - 1)
    win = x[batch[:, None], span].masked_fill(outside[..., None], 0.0)
    win_pad = pad[batch[:, None], span] | outside[..., None]
    win_gaps = gaps[span] | outside[..., None]
    level = torch.bucketize(point, lengths.cumsum(0), right=True)  # of each window's centre
    out = reg_head(win, win_pad, win_gaps, level[:, None])[:, r]
    offsets = x.new_zeros(b, p, out.shape[-1])
    offsets[batch, point] = out
    return offsets
