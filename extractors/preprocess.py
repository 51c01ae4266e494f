"""Preprocessing per preset: output size of the decode-time resize, then crop, channel order,
value range and mean/std on the device, once per frame (clips share frames, so this is never
repeated per clip)."""

from __future__ import annotations

import torch

from extractors.presets import Preset


def resize_shape(height: int, width: int, mode: str, size: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) after resizing: short side to ``size[0]`` keeping the aspect ratio, or squash
    to ``size`` = (height, width)."""
    if mode == "squash":
        return int(size[0]), int(size[1])
    short = int(size[0])
    if height <= width:
        return short, max(1, round(width * short / height))
    return max(1, round(height * short / width)), short


class FramePreprocessor:
    """uint8 RGB frames (N, H, W, 3) on the host -> normalised (N, 3, h, w) on ``device``."""

    def __init__(self, preset: Preset, device: torch.device, dtype: torch.dtype = torch.float32):
        self.crop = preset.crop
        self.bgr = preset.channel_order == "BGR"
        low, high = preset.value_range
        mean = torch.tensor(preset.mean, dtype=torch.float32)
        std = torch.tensor(preset.std, dtype=torch.float32)
        # x/255 -> [low, high] -> (x - mean)/std folded into one multiply-add per channel.
        scale = (high - low) / 255.0 / std
        shift = (low - mean) / std
        self.scale = scale.view(1, 3, 1, 1).to(device)
        self.shift = shift.view(1, 3, 1, 1).to(device)
        self.device = device
        self.dtype = dtype
        self.pin = device.type == "cuda"

    def __call__(self, frames) -> torch.Tensor:
        x = torch.from_numpy(frames)
        if self.crop is not None:
            x = center_crop(x, self.crop)
        if self.pin:
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        if self.bgr:
            x = x.flip(1)
        return (x.float() * self.scale + self.shift).to(self.dtype).contiguous()


def center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """Centre crop of channels-last frames (N, H, W, C); a crop larger than the frame is an error."""
    height, width = x.shape[1], x.shape[2]
    ch, cw = crop
    if ch > height or cw > width:
        raise ValueError(f"crop {ch}x{cw} is larger than the {height}x{width} frame")
    top, left = (height - ch) // 2, (width - cw) // 2
    return x[:, top:top + ch, left:left + cw]
