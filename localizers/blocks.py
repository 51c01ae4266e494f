"""Building blocks of ActionFormer, computed channels-last.

Activations are ``(B, T, C)`` with a boolean mask ``(B, T)``: 1x1 convolutions become plain GEMMs and
LayerNorm over channels is the fused ``F.layer_norm``. Parameters keep the official shapes and names
(``conv.weight`` ``[out, in, k]``, LayerNorm ``[1, C, 1]``, Scale ``[]``) so the published checkpoints
load unchanged. The numerics follow the official blocks, including what padded positions hold
(a masked convolution zeroes its output; the LayerNorm after it then gives the bias there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv1D(nn.Module):
    """Conv1d over time whose output is zeroed at padded steps.

    ``pad`` marks the padded OUTPUT steps, bool ``(B, T_out, 1)``, or is None when no step of the batch
    is padded (zeroing would change nothing, so it is skipped). ``masked_fill`` keeps the dtype under
    autocast, where a float multiplier would promote bf16 activations back to fp32.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError("kernel must be odd")
        self.stride = stride
        self.pad = kernel // 2
        self.conv = nn.Conv1d(in_ch, out_ch, kernel, stride=stride, padding=self.pad, groups=groups, bias=bias)
        if bias:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        w, b = self.conv.weight, self.conv.bias
        if w.shape[-1] == 1 and self.stride == 1 and self.conv.groups == 1:
            out = F.linear(x, w[:, :, 0], b)
        elif self.conv.groups == 1 and _low_precision(x):
            # im2col + one GEMM: with bf16 on CPU the GEMM runs on AMX, several times faster than the
            # conv kernel; the 3x column copy is cheap next to it
            x = F.pad(x.to(torch.get_autocast_dtype(x.device.type)), (0, 0, self.pad, self.pad))
            k, t_out = w.shape[-1], (x.shape[1] - w.shape[-1]) // self.stride + 1
            # taps side by side (a cat of shifted views: its backward is plain slicing, much cheaper
            # than unfold's), weights reordered to (out, tap, in) to match
            cols = torch.cat([x[:, j: j + self.stride * (t_out - 1) + 1: self.stride] for j in range(k)], dim=-1)
            out = F.linear(cols, w.transpose(1, 2).flatten(1), b)
        elif self.conv.groups == 1 and self.stride == 1 and x.device.type == "cpu":
            # fp32 on CPU: one GEMM of every tap's weights, (B, T, C_in) x (C_in, k * C_out), then the taps'
            # products shifted into place and summed (col2im on the output side). Measured fwd + bwd on
            # an AMD EPYC (AVX-512): oneDNN's conv1d on the transposed view ran the heads' and embedding
            # convs at a third to half of GEMM speed inside the model (layout reorders of every input and
            # gradient); im2col copies the wide input three times (2048 channels in the first conv)
            out = _ShiftSum.apply(F.linear(x, w.permute(2, 0, 1).flatten(0, 1)), w.shape[-1])
            out = out if b is None else out + b
        elif self.conv.groups == 1:
            out = F.conv1d(x.transpose(1, 2), w, b, stride=self.stride, padding=self.pad).transpose(1, 2)
        else:
            # depthwise: (B, T, C) viewed as a channels-last (B, C, 1, T) image, read and written in
            # place by the conv, no transposed copies
            out = F.conv2d(x.transpose(1, 2).unsqueeze(2), w.unsqueeze(2), b, stride=(1, self.stride),
                           padding=(0, self.pad), groups=self.conv.groups).squeeze(2).transpose(1, 2)
        return out if pad is None else out.masked_fill(pad, 0.0)


class _ShiftSum(torch.autograd.Function):
    """``(B, T, k * C)`` products of each tap ``j`` at each step -> ``(B, T, C)`` convolution output,
    ``y[t] = sum_j z_j[t + j - k // 2]`` (zero outside the sequence). Its backward writes the shifted
    gradient of each tap into one buffer (autograd's slicing would build k zero-filled copies)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, k: int) -> torch.Tensor:
        t, c, p = z.shape[1], z.shape[2] // k, k // 2
        ctx.k = k
        y = z[:, :, p * c:(p + 1) * c].clone()
        for j in range(k):
            s = j - p
            if s < 0:
                y[:, -s:] += z[:, :t + s, j * c:(j + 1) * c]
            elif s > 0:
                y[:, :t - s] += z[:, s:, j * c:(j + 1) * c]
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        k = ctx.k
        b, t, c = g.shape
        p = k // 2
        gz = g.new_empty(b, t, k * c)
        for j in range(k):
            s, tap = j - p, gz[:, :, j * c:(j + 1) * c]
            if s == 0:
                tap.copy_(g)
            elif s < 0:
                tap[:, :t + s].copy_(g[:, -s:])
                tap[:, t + s:].zero_()
            else:
                tap[:, s:].copy_(g[:, :t - s])
                tap[:, :s].zero_()
        return gz, None


def _low_precision(x: torch.Tensor) -> bool:
    dev = x.device.type
    return torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) in (torch.bfloat16, torch.float16)


class LayerNorm(nn.Module):
    """LayerNorm over channels with the official ``[1, C, 1]`` parameters."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        return F.layer_norm(x, (c,), self.weight.view(c), self.bias.view(c), self.eps)


class Scale(nn.Module):
    """A learnable scalar (per FPN level on the regression head)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(init, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class AffineDropPath(nn.Module):
    """Per-channel scale (init 1e-4) then stochastic depth: whole samples dropped in training."""

    def __init__(self, channels: int, drop_prob: float, init: float = 1e-4):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale = nn.Parameter(init * torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale.view(-1).to(x.dtype)  # under autocast the residual stream stays bf16
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        sample_mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (sample_mask / keep)


def local_attention_mask(mask: torch.Tensor, window: int, block: int) -> torch.Tensor:
    """Boolean SDPA mask of a blocked local attention, built once per level and shared by its blocks.

    The sequence is cut into query blocks of ``block`` steps; block ``n`` sees keys
    ``[n*block - w, (n+1)*block + w)`` (``w = window // 2``), so query ``i`` attends to ``|i - j| <= w``
    among valid keys, as the official sliding-chunk attention. Padded queries may see every key of their
    band (their output is zeroed anyway), which keeps each softmax row non-empty.
    Returns ``(B, n_blocks, 1, block, block + 2w)``.
    """
    b, t = mask.shape
    w = window // 2
    n_blocks = -(-t // block)
    t_pad = n_blocks * block
    key_valid = F.pad(mask, (w, t_pad - t + w))
    keys = key_valid.unfold(1, block + 2 * w, block)                     # (B, n, block + 2w)
    q_valid = F.pad(mask, (0, t_pad - t)).view(b, n_blocks, block)
    i = torch.arange(block, device=mask.device)[:, None]
    j = torch.arange(block + 2 * w, device=mask.device)[None, :]
    band = (j - i >= 0) & (j - i <= 2 * w)
    allowed = band & (keys[:, :, None, :] | ~q_valid[:, :, :, None])
    return allowed.unsqueeze(2)


def attention_mask_for(mask: torch.Tensor, window: int, block: int) -> torch.Tensor:
    """Local blocked mask for ``window > 1``; else a global one ``(B, 1, 1, T)``."""
    if window > 1:
        return local_attention_mask(mask, window, block)
    return mask[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, n_head: int,
           window: int, block: int, n_kv_head: int | None = None) -> torch.Tensor:
    """Multi-head attention of ``(B, T, C)`` q/k/v under :func:`attention_mask_for`'s mask.

    ``n_kv_head`` (grouped-query attention): k / v are ``(B, T, n_kv_head * C / n_head)``, each of their
    heads shared by ``n_head / n_kv_head`` query heads inside SDPA (no repeated copies)."""
    b, t, c = q.shape
    hd = c // n_head
    kv_heads = n_kv_head or n_head
    gqa = {"enable_gqa": True} if kv_heads != n_head else {}
    if attn_mask.dim() == 4:  # global: (B, 1, 1, T)
        heads = [x.view(b, t, x.shape[-1] // hd, hd).transpose(1, 2) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads, attn_mask=attn_mask, **gqa)
        return out.transpose(1, 2).reshape(b, t, c)
    w = window // 2
    n_blocks = attn_mask.shape[1]
    t_pad = n_blocks * block
    span = block + 2 * w
    # blocks folded into the batch: 4-D inputs take SDPA's fused CPU / CUDA kernels
    qb = F.pad(q, (0, 0, 0, t_pad - t)).view(b * n_blocks, block, n_head, hd).transpose(1, 2)

    def windows(x: torch.Tensor) -> torch.Tensor:
        # keys of block n: its w left neighbours, the block, its w right neighbours; built from three
        # block-strided views of the padded sequence (cheaper backward than an overlapping unfold)
        ch = x.shape[-1]
        xp = F.pad(x, (0, 0, w, t_pad - t + w))                           # (B, t_pad + 2w, ch)
        blocks = [xp[:, o: o + t_pad].view(b, n_blocks, block, ch) for o in (0, w, 2 * w)]
        xw = torch.cat([blocks[0][:, :, :w], blocks[1], blocks[2][:, :, block - w:]], dim=2)
        return xw.view(b * n_blocks, span, ch // hd, hd).transpose(1, 2)

    out = F.scaled_dot_product_attention(qb, windows(k), windows(v), attn_mask=attn_mask.flatten(0, 1), **gqa)
    return out.transpose(1, 2).reshape(b, t_pad, c)[:, :t]


class LocalMaskedMHCA(nn.Module):
    """Multi-head convolutional self-attention (depthwise conv + LayerNorm before each projection),
    local (banded) or global, with optional 2x downsampling of queries, keys and values."""

    def __init__(self, dim: int, n_head: int, window: int, stride: int = 1, block: int = 64):
        super().__init__()
        self.n_head, self.window, self.stride, self.block = n_head, window, stride, block
        kernel = stride + 1 if stride > 1 else 3
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_conv", MaskedConv1D(dim, dim, kernel, stride=stride, groups=dim, bias=False))
            setattr(self, f"{name}_norm", LayerNorm(dim))
        self.key = nn.Conv1d(dim, dim, 1)
        self.query = nn.Conv1d(dim, dim, 1)
        self.value = nn.Conv1d(dim, dim, 1)
        self.proj = nn.Conv1d(dim, dim, 1)
        for conv in (self.key, self.query, self.value, self.proj):
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None, attn_mask: torch.Tensor) -> torch.Tensor:
        """``pad``: padded output steps or None (nothing padded); see MaskedConv1D."""
        q = _pointwise(self.query, self.query_norm(self.query_conv(x, pad)))
        k = _pointwise(self.key, self.key_norm(self.key_conv(x, pad)))
        v = _pointwise(self.value, self.value_norm(self.value_conv(x, pad)))
        out = _pointwise(self.proj, attend(q, k, v, attn_mask, self.n_head, self.window, self.block))
        return out if pad is None else out.masked_fill(pad, 0.0)


def _pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, conv.weight[:, :, 0], conv.bias)


def _max_pool_3_2(x: torch.Tensor) -> torch.Tensor:
    """MaxPool1d(kernel 3, stride 2, padding 1) over time of a channels-last tensor. An odd length gives
    ``ceil(T / 2)`` steps, as the strided convolutions do (the last one, past the end, is a padded step)."""
    t_out = -(-x.shape[1] // 2)
    xp = F.pad(x, (0, 0, 1, 2 * t_out - x.shape[1] + 1), value=float("-inf"))
    a = xp[:, 0: 2 * t_out: 2]
    b = xp[:, 1: 2 * t_out + 1: 2]
    c = xp[:, 2: 2 * t_out + 2: 2]
    return torch.maximum(torch.maximum(a, b), c)


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: local MHCA + 2-layer MLP (``mlp_ratio``x, GELU; 4 as the official model,
    6 in TBTFormer's scaled backbone), affine drop path on both residual branches; with ``stride`` 2 the
    skip path is a 3/2 max-pool (the pyramid downsampling)."""

    def __init__(self, dim: int, n_head: int, window: int, stride: int = 1, drop_path: float = 0.0, block: int = 64,
                 mlp_ratio: int = 4):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("stride must be 1 or 2")
        self.stride = stride
        self.ln1 = LayerNorm(dim)
        self.ln2 = LayerNorm(dim)
        self.attn = LocalMaskedMHCA(dim, n_head, window, stride=stride, block=block)
        # a container only (forward uses GEMMs); its indices give the official names mlp.0 / mlp.3
        hidden = mlp_ratio * dim
        self.mlp = nn.Sequential(nn.Conv1d(dim, hidden, 1), nn.GELU(), nn.Identity(), nn.Conv1d(hidden, dim, 1))
        for conv in (self.mlp[0], self.mlp[3]):
            nn.init.zeros_(conv.bias)
        if drop_path > 0:
            self.drop_path_attn = AffineDropPath(dim, drop_path)
            self.drop_path_mlp = AffineDropPath(dim, drop_path)
        else:
            self.drop_path_attn = nn.Identity()
            self.drop_path_mlp = nn.Identity()

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None, attn_mask: torch.Tensor) -> torch.Tensor:
        """``pad``: padded output steps or None; ``attn_mask`` of the output level."""
        out = self.attn(self.ln1(x), pad, attn_mask)
        skip = _max_pool_3_2(x) if self.stride == 2 else x
        out = (skip if pad is None else skip.masked_fill(pad, 0.0)) + self.drop_path_attn(out)
        h = _pointwise(self.mlp[3], F.gelu(_pointwise(self.mlp[0], self.ln2(out))))
        return out + self.drop_path_mlp(h if pad is None else h.masked_fill(pad, 0.0))


def sinusoid_encoding(n_position: int, dim: int) -> torch.Tensor:
    """The fixed sinusoidal table of the official code, ``(n_position, dim)``."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    rates = torch.pow(10000.0, 2 * (torch.arange(dim) // 2).double() / dim)[None, :]
    table = pos / rates
    table[:, 0::2] = torch.sin(table[:, 0::2])
    table[:, 1::2] = torch.cos(table[:, 1::2])
    return table.float()


def pad_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """Padded steps ``(B, T, 1)`` of a validity mask, or None when nothing in the batch is padded."""
    return None if bool(mask.all()) else ~mask.unsqueeze(-1)


def block_size_for(window: int) -> int:
    """Query block of the blocked local attention: a few windows long so the band wastes little."""
    return max(32, 1 << math.ceil(math.log2(max(window, 2) * 3)))
