"""R(2+1)D-34 (Tran et al. 2018) as a feature backbone: the TSP encoder (Alwassel et al. 2021).

Module names follow torchvision's ``VideoResNet`` (``stem.0``, ``layer1.0.conv1.0.0`` ...), the naming of
the ig65m-pytorch state dicts, so those load natively once their ``fc`` head is set aside; the TSP
checkpoint loads from ``['model']`` with ``features.`` stripped and its ``fc1`` / ``fc2`` heads dropped.

Two details decide whether published weights fit:
- every (2+1)D convolution gets its own middle width ``in*out*27 // (in*9 + 3*out)`` from its own input
  and output channels. That is how the Caffe2 / ig65m models were built and what the TSP checkpoint holds
  (``layer2.0.conv2`` has 288 middle channels, not the 230 of its block's first convolution);
- every BatchNorm uses ``eps=1e-3`` (Caffe2 parity, as TSP sets it); PyTorch's default 1e-5 shifts
  features.
The feature is the last stage averaged over time and space: 512-d, one vector per clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline.checkpoints import KeyFormat, load_weights
from extractors.weights import needed_file
from pipeline.errors import ConfigError

FULL_LAYERS = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)
STEM_MID = 45
TINY = {"width": 0.125, "layers": (1, 1, 1, 1)}
# TSP sets PyTorch momentum 0.9 to mirror Caffe2's; it only matters when training.
BN = {"eps": 1e-3, "momentum": 0.9}

# Listed most specific first: on a tie (an ig65m file fits both) the first format names the file.
FORMATS = (
    KeyFormat("ig65m-pytorch r2plus1d_34 state dict", drop=(r"fc\.",)),
    KeyFormat("HumamAlwassel/TSP checkpoint['model']", drop=(r"fc\d*\.",), prefixes=("features.",)),
)


def mid_channels(in_channels: int, out_channels: int) -> int:
    """Middle width of a (2+1)D conv: the parameter count of the full 3x3x3 conv it replaces."""
    return (in_channels * out_channels * 27) // (in_channels * 9 + 3 * out_channels)


class Conv2Plus1D(nn.Sequential):
    """Spatial 1x3x3 conv, BN, ReLU, temporal 3x1x1 conv; ``stride`` applies in space then in time."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        mid = mid_channels(in_channels, out_channels)
        super().__init__(
            nn.Conv3d(in_channels, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
            nn.BatchNorm3d(mid, **BN),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, out_channels, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False),
        )


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Sequential(Conv2Plus1D(in_channels, out_channels, stride),
                                   nn.BatchNorm3d(out_channels, **BN), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(Conv2Plus1D(out_channels, out_channels), nn.BatchNorm3d(out_channels, **BN))
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm3d(out_channels, **BN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.conv2(self.conv1(x)) + shortcut)


class R2Plus1D(nn.Module):
    """R(2+1)D ResNet. ``width`` scales every channel count, ``layers`` gives the blocks per stage."""

    def __init__(self, in_channels: int = 3, width: float = 1.0, layers: Sequence[int] = FULL_LAYERS):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ConfigError(f"r2plus1d_34.layers: expected 4 positive block counts, got {layers}")
        if width <= 0:
            raise ConfigError(f"r2plus1d_34.width: must be positive, got {width}")
        widths = [max(1, round(c * width)) for c in STAGE_WIDTHS]
        stem_mid = max(1, round(STEM_MID * width))
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, stem_mid, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
            nn.BatchNorm3d(stem_mid, **BN), nn.ReLU(inplace=True),
            nn.Conv3d(stem_mid, widths[0], (3, 1, 1), 1, (1, 0, 0), bias=False),
            nn.BatchNorm3d(widths[0], **BN), nn.ReLU(inplace=True),
        )
        channels = widths[0]
        for index, (n_blocks, out) in enumerate(zip(layers, widths)):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(channels, out, stride)] + [BasicBlock(out, out) for _ in range(n_blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            channels = out
        self.feature_dim = channels

    def forward_map(self, clips: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> last-stage map [B, D, T/8, H/16, W/16] (sizes rounded up)."""
        x = self.stem(clips)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
        return x

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward_map(clips).float().mean(dim=(2, 3, 4))


def build(*, tiny: bool = False, weights: str | Path | None = None, strict: bool = True, seed: int = 0,
          **arch_overrides) -> R2Plus1D:
    """R(2+1)D-34 backbone (512-d), in eval mode. ``weights``: the TSP checkpoint or an ig65m
    r2plus1d_34 state dict. Arch overrides: ``width``, ``layers``, ``in_channels``."""
    unknown = set(arch_overrides) - {"width", "layers", "in_channels"}
    if unknown:
        raise ConfigError(f"r2plus1d_34: unknown parameter(s) {', '.join(sorted(unknown))}")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's generator
        torch.manual_seed(seed)
        model = R2Plus1D(**{**(TINY if tiny else {}), **arch_overrides})
    model.weight_reports = ()
    if weights is not None:
        model.weight_reports = (load_weights(model, weights, FORMATS, needed=needed_file("r2plus1d_34"),
                                             target="r2plus1d_34", strict=strict),)
    return model.eval()
