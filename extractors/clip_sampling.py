"""Which sampled frames each clip covers, on the time grid of ``pipeline.timemap``.

Clip ``i`` takes sampled frames ``stride*i + k*frame_interval`` for ``k < clip_len``. Tail rules:
``drop`` keeps whole clips only (ActionFormer's THUMOS features, ``(F - span)//stride + 1``);
``pad`` adds one clip over the leftover tail (Ego4D), its missing frames repeating the last frame.
Overlapping clips share frames, so the engine decodes each frame once and slices the windows out of
a buffer in memory; :class:`ClipWindows` says, as frames arrive, which clips of a sampler's plan
(``extractors.samplers``) are complete and which frames are still needed.
"""

from __future__ import annotations

import numpy as np

from pipeline.timemap import TimeGrid


def clip_frame_indices(grid: TimeGrid, n_frames: int, tail: str = "drop") -> np.ndarray:
    """(n_clips, clip_len) int64 sampled-frame indices of every clip of an ``n_frames`` video."""
    return clip_rows(grid, grid.count(n_frames, tail), n_frames)


def frames_needed(grid: TimeGrid, n_frames: int, tail: str = "drop") -> int:
    """How many leading sampled frames the clips read: the dropped tail is never decoded."""
    n_clips = grid.count(n_frames, tail)
    if n_clips == 0:
        return 0
    last = grid.stride * (n_clips - 1) + (grid.clip_len - 1) * grid.frame_interval
    return min(last + 1, n_frames)


def clip_rows(grid: TimeGrid, n_clips: int, n_frames: int) -> np.ndarray:
    """The first ``n_clips`` clips of the grid, indices past ``n_frames`` repeating the last frame."""
    starts = np.arange(n_clips, dtype=np.int64) * grid.stride
    rows = starts[:, None] + np.arange(grid.clip_len, dtype=np.int64)[None, :] * grid.frame_interval
    return np.minimum(rows, max(n_frames - 1, 0))


class ClipWindows:
    """Online clip emission over the stream of decoded frames of one video (a sampler's plan)."""

    def __init__(self, plan):
        self.plan = plan
        self.emitted = 0
        # First decoded frame any clip from k on reads: earlier frames may be freed once k is reached.
        starts = plan.clips.min(1) if plan.n_clips else np.zeros(0, dtype=np.int64)
        self._keep = np.append(np.minimum.accumulate(starts[::-1])[::-1], len(plan.frames))

    def ready(self, n_received: int) -> tuple[int, np.ndarray]:
        """Clips whose frames are all among the first ``n_received`` decoded and not emitted yet:
        ``(index of the first, (k, clip_len) rows into the decoded frames)``."""
        stop = self.emitted + int(np.searchsorted(self.plan.ready_at[self.emitted:], n_received, side="right"))
        return self._emit(stop)

    def finish(self) -> tuple[int, np.ndarray]:
        """The remaining clips once every planned frame is in (the padded tail)."""
        return self._emit(self.plan.n_clips)

    def keep_from(self) -> int:
        """First decoded frame any clip not yet emitted reads; earlier frames may be freed."""
        return int(self._keep[self.emitted])

    def _emit(self, stop: int) -> tuple[int, np.ndarray]:
        first = self.emitted
        self.emitted = max(stop, first)
        return first, self.plan.clips[first:self.emitted]
