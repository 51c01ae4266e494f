"""Which sampled frames each clip covers, on the time grid of ``pipeline.timemap``.

Clip ``i`` takes sampled frames ``stride*i + k*frame_interval`` for ``k < clip_len``. Tail rules:
``drop`` keeps whole clips only (ActionFormer's THUMOS features, ``(F - span)//stride + 1``);
``pad`` adds one clip over the leftover tail (Ego4D), its missing frames repeating the last frame.
Overlapping clips share frames, so the engine decodes each frame once and slices the windows out of
a buffer in memory; :class:`ClipWindows` says, as frames arrive, which clips are complete and which
frames are still needed.
"""

from __future__ import annotations

import numpy as np

from pipeline.timemap import TimeGrid


def clip_frame_indices(grid: TimeGrid, n_frames: int, tail: str = "drop") -> np.ndarray:
    """(n_clips, clip_len) int64 sampled-frame indices of every clip of an ``n_frames`` video."""
    return _clip_rows(grid, 0, grid.count(n_frames, tail), n_frames)


def frames_needed(grid: TimeGrid, n_frames: int, tail: str = "drop") -> int:
    """How many leading sampled frames the clips read: the dropped tail is never decoded."""
    n_clips = grid.count(n_frames, tail)
    if n_clips == 0:
        return 0
    last = grid.stride * (n_clips - 1) + (grid.clip_len - 1) * grid.frame_interval
    return min(last + 1, n_frames)


def _clip_rows(grid: TimeGrid, first: int, stop: int, n_frames: int) -> np.ndarray:
    starts = np.arange(first, stop, dtype=np.int64) * grid.stride
    rows = starts[:, None] + np.arange(grid.clip_len, dtype=np.int64)[None, :] * grid.frame_interval
    return np.minimum(rows, max(n_frames - 1, 0))


class ClipWindows:
    """Online clip emission over a stream of sampled frames (one video)."""

    def __init__(self, grid: TimeGrid, tail: str = "drop"):
        self.grid = grid
        self.tail = tail
        self.emitted = 0

    def ready(self, n_received: int) -> tuple[int, np.ndarray]:
        """Clips completed by the first ``n_received`` frames and not emitted yet:
        ``(index of the first, (k, clip_len) frame indices)``."""
        return self._emit(self.grid.count(n_received, "drop"), n_received)

    def finish(self, n_total: int) -> tuple[int, np.ndarray]:
        """The remaining clips once the video's ``n_total`` frames are all in (the padded tail)."""
        return self._emit(self.grid.count(n_total, self.tail), n_total)

    def keep_from(self) -> int:
        """First frame index any clip not yet emitted can read; earlier frames may be freed."""
        return self.emitted * self.grid.stride

    def _emit(self, stop: int, n_frames: int) -> tuple[int, np.ndarray]:
        first = self.emitted
        rows = _clip_rows(self.grid, first, max(stop, first), n_frames)
        self.emitted = max(stop, first)
        return first, rows
