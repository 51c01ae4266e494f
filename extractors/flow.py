"""Optical flow for I3D's flow stream, computed from the decoded frames on the fly (never written to disk).

Flow as the public two-stream features made it (deepmind/kinetics-i3d; the TV-L1 JPEG pipelines behind
the THUMOS14 I3D features): between consecutive sampled frames, at the resolution frames leave the
decoder (the preset's resize, before its crop), clipped to [-bound, bound] (20 px), optionally
quantised to 8 bits as a JPEG pipeline stores it, and scaled to [-1, 1]. Estimators: RAFT
(``extractors.raft``, batched on the device) or TV-L1 through OpenCV's contrib module.

Flow frame ``i`` is the flow from frame ``i`` to ``i + 1``. The last frame of a video has no successor
and repeats the flow before it (a 1-frame video gets zero flow), so a video of N frames costs N - 1
flow computations and every clip window, whatever its overlap, reads flows computed once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from extractors.preprocess import FramePreprocessor, center_crop
from extractors.presets import FlowSpec
from pipeline.errors import ConfigError


def to_unit_range(flow: torch.Tensor, bound: float, quantize: bool) -> torch.Tensor:
    """Flow in pixels -> [-1, 1]: clip to [-bound, bound]; with ``quantize``, round to the 256 levels
    a JPEG flow image holds (``(f + bound) / (2 bound) * 255``) and read back as ``x / 255 * 2 - 1``."""
    flow = flow.clamp(-bound, bound)
    if quantize:
        return torch.round((flow + bound) * (255.0 / (2 * bound))) * (2.0 / 255.0) - 1.0
    return flow / bound


class _Raft:
    def __init__(self, spec: FlowSpec, weights, device: torch.device):
        from extractors.raft import build

        self.model = build(spec.arch, weights=weights, iters=spec.iters).to(device)
        self.device = device
        self.weight_reports = self.model.weight_reports

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return self.model.consecutive(x)


class _TVL1:
    """OpenCV's Dual TV-L1 with its default parameters (those of the I3D / TV-L1 JPEG pipelines) on
    grayscale frames, one pair at a time on the CPU."""

    weight_reports = ()

    def __init__(self, device: torch.device):
        self.algo = tvl1_factory()()
        self.device = device

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        import cv2

        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames.cpu().numpy()]
        flows = [self.algo.calc(a, b, None) for a, b in zip(gray[:-1], gray[1:])]
        return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).to(self.device)


def tvl1_factory():
    """``cv2.optflow.DualTVL1OpticalFlow_create``, or a ConfigError that says how to get it."""
    try:
        import cv2

        return cv2.optflow.DualTVL1OpticalFlow_create
    except (ImportError, AttributeError):
        raise ConfigError("extract.flow.estimator: tvl1 needs OpenCV's contrib module "
                          "(cv2.optflow.DualTVL1OpticalFlow_create); pip install opencv-contrib-python-headless, "
                          "or use estimator raft") from None


class FlowComputer:
    """Consecutive-frame flow of uint8 frames, batched, already clipped and scaled for I3D.
    ``pairs`` counts the flow computations made, ``seconds`` the time they took (host time: on CUDA
    it ends when the last result is queued, not computed)."""

    def __init__(self, spec: FlowSpec, device: torch.device, *, weights=None, batch_size: int = 8):
        self.spec = spec
        self.estimate = _TVL1(device) if spec.estimator == "tvl1" else _Raft(spec, weights, device)
        self.weight_reports = self.estimate.weight_reports
        self.batch_size = max(1, int(batch_size))
        self.pairs = 0
        self.seconds = 0.0

    def clip_flows(self, frames) -> torch.Tensor:
        """uint8 RGB frames (N, H, W, 3), numpy or torch -> (N - 1, 2, H, W) float32 in [-1, 1]: each
        consecutive pair once, ``batch_size`` pairs per forward (overlapping by one frame)."""
        t0 = time.perf_counter()
        frames = torch.as_tensor(frames)
        parts = []
        step = self.batch_size
        for start in range(0, len(frames) - 1, step):
            chunk = frames[start:start + step + 1]
            parts.append(to_unit_range(self.estimate(chunk).float(), self.spec.bound, self.spec.quantize))
            self.pairs += len(chunk) - 1
        self.seconds += time.perf_counter() - t0
        return torch.cat(parts) if parts else torch.zeros((0, 2, *frames.shape[1:3]))


@dataclass
class _Held:
    """The last frame of the chunks so far: its flow needs the next frame."""

    raw: torch.Tensor | None = None
    rgb: torch.Tensor | None = None
    last_flow: torch.Tensor | None = None


class StreamFrames:
    """The engine's frame transform: a video's decoded uint8 frames, chunk by chunk -> the frames its
    model reads, (k, C, h, w) on the device: RGB (3 channels), flow (2) or both (5, RGB first).

    RGB is preprocessed by the preset (crop, value range, mean / std). Flow is computed on the uncropped
    frames and cropped like RGB. With flow, a chunk's last frame is held back until the next chunk (or
    ``end``) brings its successor."""

    def __init__(self, prep: FramePreprocessor, streams: str = "rgb", flow: FlowComputer | None = None,
                 crop: tuple[int, int] | None = None):
        if streams != "rgb" and flow is None:
            raise ValueError("a flow stream needs a FlowComputer")
        self.prep, self.streams, self.flow, self.crop = prep, streams, flow, crop

    def begin(self) -> _Held:
        return _Held()

    def push(self, held: _Held, frames: np.ndarray) -> torch.Tensor:
        if self.streams == "rgb":
            return self.prep(frames)
        raw = torch.from_numpy(frames)
        seq = raw if held.raw is None else torch.cat([held.raw, raw])
        flows = self._flows(seq)
        rgb = self.prep(frames) if self.streams == "both" else None
        if held.rgb is not None and rgb is not None:
            rgb = torch.cat([held.rgb, rgb])
        held.raw = raw[-1:]
        if len(flows):
            held.last_flow = flows[-1:]
        if rgb is not None:
            rgb, held.rgb = rgb[:-1], rgb[-1:]
        return self._join(rgb, flows)

    def end(self, held: _Held) -> torch.Tensor | None:
        """The held last frame, with the flow before it repeated (zero flow for a 1-frame video);
        None when nothing is held (RGB only, or no frames)."""
        if held.raw is None:
            return None
        flow = held.last_flow
        if flow is None:
            h, w = self.crop or held.raw.shape[1:3]
            flow = torch.zeros((1, 2, h, w), device=self.prep.device, dtype=self.prep.dtype)
        return self._join(held.rgb, flow)

    def _flows(self, seq: torch.Tensor) -> torch.Tensor:
        flows = self.flow.clip_flows(seq)
        if self.crop is not None:
            flows = center_crop(flows.permute(0, 2, 3, 1), self.crop).permute(0, 3, 1, 2)
        return flows.to(self.prep.device, self.prep.dtype)

    def _join(self, rgb: torch.Tensor | None, flow: torch.Tensor) -> torch.Tensor:
        if self.streams == "flow":
            return flow.contiguous()
        return torch.cat([rgb, flow], 1).contiguous()
