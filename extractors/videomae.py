"""VideoMAE / VideoMAE v2 ViT encoders (S/B/L/H/g) with the module names of the official fine-tuned models.

Architecture as in OpenGVLab/VideoMAEv2 ``models/modeling_finetune.py`` (and MCG-NJU/VideoMAE v1):
tubelet-2 conv patch embedding, a fixed 1-D sinusoid over the flattened (T', H', W') token order (no
``pos_embed`` key), pre-norm blocks whose ``qkv`` has no bias but separate ``q_bias`` / ``v_bias``
(the key bias is zero), LayerNorm eps 1e-6, exact GELU, mean pooling followed by ``fc_norm``.

Outputs:
- ``forward`` -> ``[B, embed_dim]`` = ``fc_norm(tokens.mean(1))`` (what ``forward_features`` returns).
- ``forward_map`` -> ``[B, embed_dim, T/tubelet, H/patch, W/patch]``: the last block's tokens (before any
  norm, as mmaction2's ``return_feat_map`` gives them) laid back onto their space-time grid.
- ``forward_keyframe`` -> ``(map [B, C, H/p, W/p], context [B, C, T/tubelet])``: that map averaged over
  time, and max-pooled over space per token time step. Frames whose sides are not multiples of the
  patch lose the remainder at the bottom and right, as the stride-``p`` patch convolution of the
  reference models drops it.

Other input sizes / frame counts than the native ``img_size`` / ``num_frames``: ``pos_mode='resample'``
(default) reshapes the native table to its (T', H', W') grid and resamples it trilinearly, so every token
keeps the position it had at the native size; ``pos_mode='recompute'`` builds the 1-D sinusoid for the new
token count, as the reference code does when constructed at that size. At the native size both are
exactly the native table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoints import KeyFormat, LoadReport, load_weights
from extractors.weights import needed_file
from pipeline.errors import ConfigError

VARIANTS = {
    "vit_s": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, patch_size=16),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, patch_size=16),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, patch_size=16),
    "vit_g": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11, patch_size=14),
}
TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=64, num_frames=8)

@dataclass(frozen=True)
class VideoMAEConfig:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    tubelet: int = 2
    img_size: int = 224
    num_frames: int = 16
    in_channels: int = 3
    pos_mode: str = "resample"

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"videomae: embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size or self.num_frames % self.tubelet:
            raise ConfigError(f"videomae: img_size {self.img_size} / num_frames {self.num_frames} must be "
                              f"multiples of patch_size {self.patch_size} / tubelet {self.tubelet}")
        if self.pos_mode not in ("resample", "recompute"):
            raise ConfigError(f"videomae: pos_mode must be 'resample' or 'recompute', got {self.pos_mode!r}")

    @property
    def grid(self) -> tuple[int, int, int]:
        side = self.img_size // self.patch_size
        return self.num_frames // self.tubelet, side, side


def sinusoid_table(n_positions: int, dim: int) -> torch.Tensor:
    """[n_positions, dim] float32: sin at even, cos at odd channels, angle pos / 10000^(2*(j//2)/dim),
    evaluated in float64 like the reference numpy code."""
    j = torch.arange(dim, dtype=torch.float64)
    angle = torch.arange(n_positions, dtype=torch.float64)[:, None] / torch.pow(10000.0, 2 * (j // 2) / dim)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()


def position_table(cfg: VideoMAEConfig, grid: tuple[int, int, int]) -> torch.Tensor:
    """[T'*H'*W', C] position embedding for an input whose token grid is ``grid``."""
    native = cfg.grid
    table = sinusoid_table(native[0] * native[1] * native[2], cfg.embed_dim)
    if tuple(grid) == native:
        return table
    if cfg.pos_mode == "recompute":
        return sinusoid_table(grid[0] * grid[1] * grid[2], cfg.embed_dim)
    volume = table.reshape(*native, cfg.embed_dim).permute(3, 0, 1, 2)[None]
    volume = F.interpolate(volume, size=tuple(grid), mode="trilinear", align_corners=False)
    return volume[0].permute(1, 2, 3, 0).reshape(-1, cfg.embed_dim)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale head_dim ** -0.5, as published
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        kernel = (cfg.tubelet, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel, kernel)

    def forward(self, x):
        return self.proj(x)


class VideoMAE(nn.Module):
    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.in_channels = cfg.in_channels
        self.feature_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def init_weights(self) -> None:
        """The reference initialisation (timm's ``trunc_normal_(std=.02)`` cuts at +-2, i.e. never)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.Conv3d)):
                m.reset_parameters()
            elif isinstance(m, Attention):
                nn.init.zeros_(m.q_bias)
                nn.init.zeros_(m.v_bias)

    def position_embedding(self, grid: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
        """The table for ``grid`` on ``like``'s device and dtype, built once per combination."""
        key = (grid, like.device, like.dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = position_table(self.cfg, grid).to(device=like.device, dtype=like.dtype)
        return self._pos_cache[key]

    def tokens(self, clips: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Last block's tokens [B, T'*H'*W', C] in (T', H', W') order, and that grid."""
        _, _, t, h, w = clips.shape
        p, tub = self.cfg.patch_size, self.cfg.tubelet
        if t % tub or h % p or w % p:
            raise ConfigError(f"videomae: input {t}x{h}x{w} (frames x height x width) must be multiples "
                              f"of tubelet {tub} and patch {p}")
        x = self.patch_embed(clips)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        x = x + self.position_embedding(grid, x)
        for block in self.blocks:
            x = block(x)
        return x, grid

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x, _ = self.tokens(clips)
        return self.fc_norm(x.mean(1)).float()

    def forward_map(self, clips: torch.Tensor) -> torch.Tensor:
        x, grid = self.tokens(clips)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid).float()

    @property
    def feature_stride(self) -> int:
        return self.cfg.patch_size

    def forward_keyframe(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.cfg.patch_size
        h, w = clips.shape[3] // p * p, clips.shape[4] // p * p
        fmap = self.forward_map(clips[:, :, :, :h, :w])
        return fmap.mean(2), fmap.amax((3, 4))


# Official files (``model`` / ``module`` containers; ``encoder.`` / ``backbone.`` prefixes) and the
# mmaction2 / OpenTAD conversion (``tools/model_converters/convert_videomaev2.py`` in OpenTAD), which
# renames ``fc1``/``fc2``/``patch_embed.proj``/``head`` and prefixes ``backbone.``. Heads are unused.
KEY_FORMATS = (
    KeyFormat("videomae", drop=(r"(encoder\.|backbone\.)?head\.",), prefixes=("encoder.", "backbone.")),
    KeyFormat("mmaction2", drop=(r"cls_head\.", r"(backbone\.)?pos_embed$"), prefixes=("backbone.",),
              rename=((r"\.mlp\.layers\.0\.0\.", ".mlp.fc1."), (r"\.mlp\.layers\.1\.", ".mlp.fc2."),
                      (r"^patch_embed\.projection\.", "patch_embed.proj."))),
)


def check_position_buffer(state_dict: dict[str, torch.Tensor], cfg: VideoMAEConfig, source: str) -> None:
    """mmaction2 stores its fixed sinusoid as a ``pos_embed`` buffer; we recompute it, so it must be that
    sinusoid (a learned table would be silently ignored otherwise), and its length tells the native size."""
    for key in ("pos_embed", "backbone.pos_embed"):
        if key in state_dict:
            stored = state_dict[key].float().reshape(-1, state_dict[key].shape[-1])
            t, h, w = cfg.grid
            if stored.shape[0] != t * h * w:
                raise ConfigError(f"{source}: {key} has {stored.shape[0]} positions but the model's native grid "
                                  f"{t}x{h}x{w} has {t * h * w}; set videomae num_frames / img_size to the "
                                  f"size the checkpoint was trained at")
            native = sinusoid_table(stored.shape[0], stored.shape[1])
            if stored.shape[1] != cfg.embed_dim or (stored - native).abs().max() > 1e-3:
                raise ConfigError(f"{source}: {key} is not the fixed sinusoid of a {cfg.embed_dim}-d model "
                                  f"(learned position embeddings are not supported)")


def load_videomae_weights(model: VideoMAE, path: str | Path, *, needed: str, strict: bool = True) -> LoadReport:
    return load_weights(model, path, KEY_FORMATS, needed=needed, target=f"videomae {model.cfg.embed_dim}-d",
                        strict=strict, containers=("model", "module", "state_dict"),
                        check=lambda state_dict: check_position_buffer(state_dict, model.cfg, str(path)))


def build(*, tiny: bool = False, weights: str | Path | None = None, strict: bool = True, seed: int = 0,
          variant: str = "vit_b", **arch_overrides) -> VideoMAE:
    """VideoMAE encoder by ``variant`` (vit_s/b/l/h/g), fields of ``VideoMAEConfig`` overriding it.

    ``tiny``: 64-d, 2 blocks, 4 heads, native 8 frames at 64 px (same code). ``img_size`` /
    ``num_frames`` are the NATIVE size that sets the position table; other inputs are interpolated.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"videomae: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    unknown = set(arch_overrides) - set(VideoMAEConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"videomae: unknown parameter(s) {', '.join(sorted(unknown))}")
    fields = {**VARIANTS[variant], **(TINY if tiny else {}), **arch_overrides}
    cfg = VideoMAEConfig(**fields)
    with torch.device("meta"):  # allocate once, initialise once: a 1B-parameter ViT-g builds in seconds
        model = VideoMAE(cfg)
    model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights()
    model.weight_reports = () if weights is None else (
        load_videomae_weights(model, weights, needed=needed_file("videomae", variant), strict=strict),)
    return model.eval()
