"""Frame-rate policy: which native frame each sampled frame is, decided by stream timestamps.

``index / avg_fps`` is not a timestamp for variable-frame-rate video (decord #26, TSP #2), so the
sampled frames are placed on an exact grid ``t_k = t_0 + k / fps`` and each takes the native frame
on screen at that instant (the last one starting at or before it). On constant-rate input at its
own rate this is the identity; at a lower target rate it is TSP's ``floor(k * native / target)``;
on VFR input it duplicates or drops frames so that sampled frame ``k`` really shows second
``k / fps`` of the video.
"""

from __future__ import annotations

import numpy as np

# Fractions of a frame that absorb float noise in timestamps (millisecond time bases, 29.97 fps),
# so it never adds, drops or shifts a whole frame.
_END_TOLERANCE = 1e-3
_START_TOLERANCE = 0.1


def native_fps(timestamps: np.ndarray, nominal: float | None = None) -> float:
    """Mean frame rate from presentation timestamps (seconds, sorted); ``nominal`` for one frame."""
    ts = np.asarray(timestamps, dtype=np.float64)
    if len(ts) > 1 and ts[-1] > ts[0]:
        return float((len(ts) - 1) / (ts[-1] - ts[0]))
    if nominal and nominal > 0:
        return float(nominal)
    raise ValueError("cannot tell the frame rate: fewer than two distinct timestamps and no nominal rate")


def sampled_frame_count(timestamps: np.ndarray, fps: float, native: float) -> int:
    """How many frames at ``fps`` fit in the video (which ends one native frame after its last)."""
    ts = np.asarray(timestamps, dtype=np.float64)
    if len(ts) == 0:
        return 0
    duration = ts[-1] - ts[0] + 1.0 / native
    return max(int(np.ceil(duration * fps - _END_TOLERANCE)), 0)


def resample_indices(timestamps: np.ndarray, fps: float, native: float | None = None) -> np.ndarray:
    """Native frame index (int64) of every sampled frame at ``fps``: the frame on screen then."""
    ts = np.asarray(timestamps, dtype=np.float64)
    if len(ts) == 0:
        return np.zeros(0, dtype=np.int64)
    native = native or native_fps(ts)
    n = sampled_frame_count(ts, fps, native)
    targets = ts[0] + np.arange(n, dtype=np.float64) / fps + _START_TOLERANCE / native
    return np.clip(np.searchsorted(ts, targets, side="right") - 1, 0, len(ts) - 1).astype(np.int64)
