"""The one time mapping every stage uses: seconds <-> feature positions.

Feature ``i`` covers sampled frames ``[stride*i, stride*i + clip_len*frame_interval)`` and sits at
``t_i = (stride*i + offset_frames) / fps`` where ``fps`` is the *sampled* frame rate and
``offset_frames`` defaults to the clip centre, ``clip_len*frame_interval/2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np


def clip_offset(clip_len: int, frame_interval: int = 1, offset_frames: float | None = None) -> float:
    """Frames from a clip's first frame to where its feature sits: the centre unless a preset says."""
    return clip_len * frame_interval / 2 if offset_frames is None else float(offset_frames)


@dataclass(frozen=True)
class TimeGrid:
    fps: float
    stride: int
    clip_len: int
    frame_interval: int = 1
    offset_frames: float | None = None

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.stride <= 0 or self.clip_len <= 0 or self.frame_interval <= 0:
            raise ValueError(f"invalid time grid {self}")

    @property
    def span_frames(self) -> int:
        """Sampled frames covered by one feature."""
        return self.clip_len * self.frame_interval

    @property
    def offset(self) -> float:
        return clip_offset(self.clip_len, self.frame_interval, self.offset_frames)

    def to_seconds(self, index):
        """Feature position(s) (may be fractional) -> seconds."""
        return (np.asarray(index, dtype=np.float64) * self.stride + self.offset) / self.fps

    def to_index(self, seconds):
        """Seconds -> continuous feature position(s); inverse of :meth:`to_seconds`."""
        return (np.asarray(seconds, dtype=np.float64) * self.fps - self.offset) / self.stride

    def centers(self, n: int) -> np.ndarray:
        return self.to_seconds(np.arange(n))

    def frame_span(self, index: int) -> tuple[int, int]:
        """Sampled frames ``[start, stop)`` that feature ``index`` covers."""
        start = self.stride * index
        return start, start + self.span_frames

    def count(self, n_frames: int, tail: str = "drop") -> int:
        """Number of features for ``n_frames`` sampled frames.

        ``drop``: only whole clips (ActionFormer's THUMOS features, ``(F-span)//stride + 1``);
        ``pad``: one more clip covering the incomplete tail when frames are left over (Ego4D).
        """
        span = self.span_frames
        if n_frames < span:
            return 1 if (tail == "pad" and n_frames > 0) else 0
        full = (n_frames - span) // self.stride + 1
        if tail == "pad" and (n_frames - span) % self.stride:
            full += 1
        return full

    @classmethod
    def from_attrs(cls, store_attrs: Mapping, video_attrs: Mapping | None = None) -> "TimeGrid":
        """Build the grid of one video from store attributes (and its per-video sampled fps)."""
        video_attrs = video_attrs or {}
        fps = video_attrs.get("sampled_fps") or store_attrs.get("fps")
        if not fps:
            raise ValueError("no sampled fps in the video or store attributes")
        return cls(
            fps=float(fps),
            stride=int(store_attrs["stride"]),
            clip_len=int(store_attrs["clip_len"]),
            frame_interval=int(store_attrs.get("frame_interval", 1)),
            offset_frames=store_attrs.get("offset_frames"),
        )
