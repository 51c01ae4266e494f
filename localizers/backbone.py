"""ActionFormer's conv-transformer backbone: embedding convs, stem blocks, downsampling blocks; the blocks
are ActionFormer's (``backbone: v1``) or :mod:`localizers.blocks_v2`'s (``v2``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localizers.blocks import (LayerNorm, MaskedConv1D, TransformerBlock, attention_mask_for, block_size_for,
                               pad_mask, sinusoid_encoding)
from localizers.blocks_v2 import TransformerBlockV2
from localizers.config import ModelConfig


class ConvTransformerBackbone(nn.Module):
    """``(B, T, C_in)`` features -> one ``(B, T / 2^l, D)`` map and mask per pyramid level."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n_embd, n_stem, n_branch = cfg.backbone_arch
        dim = cfg.embed_dim
        self.windows = cfg.window
        self.blocks = tuple(block_size_for(w) for w in cfg.window)
        self.embd = nn.ModuleList(
            MaskedConv1D(cfg.input_dim if i == 0 else dim, dim, cfg.embed_kernel, bias=False) for i in range(n_embd))
        self.embd_norm = nn.ModuleList(LayerNorm(dim) for _ in range(n_embd))
        self.max_len = cfg.max_seq_len
        if cfg.abs_pe:
            self.register_buffer("pos_embd", sinusoid_encoding(cfg.max_seq_len, dim) / dim ** 0.5, persistent=False)
        else:
            self.pos_embd = None
        if cfg.backbone == "v2":
            def block(window, stride, size):
                return TransformerBlockV2(dim, cfg.n_head, window, stride, cfg.drop_path, size, cfg.n_kv_head,
                                          cfg.mlp_ratio)
        else:
            def block(window, stride, size):
                return TransformerBlock(dim, cfg.n_head, window, stride, cfg.drop_path, size, cfg.mlp_ratio)
        self.stem = nn.ModuleList(block(cfg.window[0], 1, self.blocks[0]) for _ in range(n_stem))
        self.branch = nn.ModuleList(block(cfg.window[i + 1], 2, self.blocks[i + 1]) for i in range(n_branch))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # every level's mask, multiplier and attention mask built once and shared by its layers
        masks = [mask[:, :: 2 ** level] for level in range(len(self.branch) + 1)]
        pads = [pad_mask(m) for m in masks]
        for conv, norm in zip(self.embd, self.embd_norm):
            x = F.relu(norm(conv(x, pads[0])))
        if self.pos_embd is not None:
            t = x.shape[1]
            pe = self.pos_embd
            if t > self.max_len:  # longer inputs at inference: stretch the table, as the official model
                pe = F.interpolate(pe.t()[None], size=t, mode="linear", align_corners=False)[0].t()
            pe = pe[:t].to(x.dtype)
            x = x + (pe if pads[0] is None else pe.masked_fill(pads[0], 0.0))
        attn_mask = attention_mask_for(masks[0], self.windows[0], self.blocks[0])
        for block in self.stem:
            x = block(x, pads[0], attn_mask)
        feats = [x]
        for level, block in enumerate(self.branch, start=1):
            attn_mask = attention_mask_for(masks[level], self.windows[level], self.blocks[level])
            x = block(x, pads[level], attn_mask)
            feats.append(x)
        return feats, masks
