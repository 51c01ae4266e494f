"""Backbone v2 blocks: RMSNorm, rotary position embeddings, SwiGLU feed-forward and grouped-query
attention, channels-last ``(B, T, C)`` like :mod:`localizers.blocks`, whose blocked local attention
(:func:`localizers.blocks.attend`: ``scaled_dot_product_attention`` on the local window, flash / fused
kernels where the device has them) they share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localizers.blocks import AffineDropPath, _max_pool_3_2, attend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rotary_tables(t: int, head_dim: int, device: torch.device, base: float = 10000.0):
    """cos / sin ``(T, 1, head_dim / 2)`` of the rotary angles of positions ``0 .. T-1``."""
    inv = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of ``(B, T, H, D)`` by the position's angles: the
    dot product of a query and a key then depends on their distance only."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class GroupedQueryAttention(nn.Module):
    """``n_kv_head`` key/value heads, each shared by ``n_head / n_kv_head`` query heads (fewer
    parameters and key/value activations); rotary positions on queries and keys; local or global."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, window: int, block: int):
        super().__init__()
        if n_head % n_kv_head:
            raise ValueError(f"n_head {n_head} is not a multiple of n_kv_head {n_kv_head}")
        self.n_head, self.n_kv_head, self.window, self.block = n_head, n_kv_head, window, block
        self.head_dim = dim // n_head
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * n_kv_head * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None, attn_mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.n_head, self.head_dim)
        k, v = self.kv(x).view(b, t, 2, self.n_kv_head, self.head_dim).unbind(2)
        cos, sin = rotary_tables(t, self.head_dim, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q.reshape(b, t, c), k.reshape(b, t, -1), v.reshape(b, t, -1), attn_mask, self.n_head,
                     self.window, self.block, self.n_kv_head)
        out = self.proj(out)
        return out if pad is None else out.masked_fill(pad, 0.0)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class TransformerBlockV2(nn.Module):
    """Pre-RMSNorm block: grouped-query attention + SwiGLU (``mlp_ratio * dim * 2/3`` hidden units, the
    parameters of a ``mlp_ratio`` GELU MLP), affine drop path; ``stride`` 2 max-pools the input first
    (the pyramid downsampling), so queries, keys and values live on the output level."""

    def __init__(self, dim: int, n_head: int, window: int, stride: int = 1, drop_path: float = 0.0,
                 block: int = 64, n_kv_head: int | None = None, mlp_ratio: int = 4):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("stride must be 1 or 2")
        self.stride = stride
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = GroupedQueryAttention(dim, n_head, n_kv_head or n_head, window, block)
        self.mlp = SwiGLU(dim, max(1, (2 * mlp_ratio * dim) // 3))
        self.drop_path_attn = AffineDropPath(dim, drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path_mlp = AffineDropPath(dim, drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None, attn_mask: torch.Tensor) -> torch.Tensor:
        """``pad``: padded output steps or None; ``attn_mask`` of the output level."""
        if self.stride == 2:
            x = _max_pool_3_2(x)
        if pad is not None:
            x = x.masked_fill(pad, 0.0)
        x = x + self.drop_path_attn(self.attn(self.norm1(x), pad, attn_mask))
        h = self.mlp(self.norm2(x))
        return x + self.drop_path_mlp(h if pad is None else h.masked_fill(pad, 0.0))
