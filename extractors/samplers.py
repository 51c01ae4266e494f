"""What a record needs from a video: which sampled frames to decode and which clips to cut from them.

A sampler turns one video's sampled-frame count and rate into a :class:`ClipPlan`, once the decoder
knows them: the frames to decode (increasing, each decoded once however many clips share it), every
clip as rows into those decoded frames, and the record (the task's item) each clip belongs to.

- :class:`GridSampler` (``extract``): the clip grid over the whole video, one record per video
  (``extractors.clip_sampling``: stride, tail rule).
- :class:`KeyframeSampler` (``extract_keyframes``): one clip centred on each keyframe of the video,
  one record per keyframe, as the AVA loaders cut them (SlowFast 8x8: 32 frames at interval 2 from
  ``centre - 32``; VideoMAE: 16 at interval 4). Indices outside the video repeat its first or last
  frame; a keyframe whose centre lies outside the video fails alone.

Samplers are small and picklable: they travel to the decode workers with each video.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from extractors.clip_sampling import clip_rows, frames_needed
from pipeline.timemap import TimeGrid


class TooShort(Exception):
    """No record of the video can be sampled (the whole video fails with kind ``too_short``)."""


@dataclass(frozen=True)
class ClipPlan:
    """``frames``: sampled-frame indices to decode, increasing. ``clips``: (n_clips, clip_len) rows into
    ``frames``. ``owners``: (n_clips,) the record of each clip. ``ready_at``: (n_clips,) how many decoded
    frames a clip waits for before it may run (past ``len(frames)``: only once decoding is done).
    ``failed``: record -> (kind, message) for records that cannot be sampled."""

    frames: np.ndarray
    clips: np.ndarray
    owners: np.ndarray
    ready_at: np.ndarray
    failed: dict = field(default_factory=dict)

    @property
    def n_clips(self) -> int:
        return len(self.clips)


@dataclass(frozen=True)
class GridSampler:
    grid: TimeGrid
    tail: str = "drop"

    def plan(self, n_sampled: int, fps: float) -> ClipPlan:
        grid = self.grid
        n_clips = grid.count(n_sampled, self.tail)
        if n_clips == 0:
            raise TooShort(f"{n_sampled} frames at {fps:.3f} fps, fewer than one clip of {grid.span_frames} "
                           f"(tail rule {self.tail!r})")
        n_decode = frames_needed(grid, n_sampled, self.tail)
        clips = clip_rows(grid, n_clips, n_decode)
        # A whole clip runs as soon as its frames are in; the padded tail clip only once decoding ends.
        whole = grid.count(n_sampled, "drop")
        ready_at = np.where(np.arange(n_clips) < whole, clips[:, -1] + 1, n_decode + 1)
        return ClipPlan(np.arange(n_decode, dtype=np.int64), clips, np.zeros(n_clips, dtype=np.int64), ready_at)


@dataclass(frozen=True)
class KeyframeSampler:
    """``times``: each record's keyframe in seconds from the start of the video file."""

    clip_len: int
    frame_interval: int
    times: tuple[float, ...]

    def plan(self, n_sampled: int, fps: float) -> ClipPlan:
        centres = np.rint(np.asarray(self.times, dtype=np.float64) * fps).astype(np.int64)
        failed = {}
        for record, (t, c) in enumerate(zip(self.times, centres)):
            if c < 0 or c >= n_sampled:
                failed[record] = ("beyond_end" if c >= n_sampled else "before_start",
                                  f"keyframe at {t:.3f} s lies outside the video (0 to {n_sampled / fps:.3f} s "
                                  f"at {fps:.3f} fps)")
        owners = np.asarray([r for r in range(len(self.times)) if r not in failed], dtype=np.int64)
        # Keyframes in time order, so clips become ready, and frames can be freed, in decode order.
        owners = owners[np.argsort(centres[owners], kind="stable")]
        offsets = (np.arange(self.clip_len, dtype=np.int64) - self.clip_len // 2) * self.frame_interval
        wanted = np.clip(centres[owners][:, None] + offsets[None, :], 0, max(n_sampled - 1, 0))
        frames, rows = np.unique(wanted, return_inverse=True)
        rows = rows.reshape(wanted.shape).astype(np.int64)
        ready_at = rows.max(1) + 1 if len(rows) else np.zeros(0, dtype=np.int64)
        return ClipPlan(frames.astype(np.int64), rows, owners, ready_at, failed)
