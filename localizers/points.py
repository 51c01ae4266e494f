"""Temporal points of every pyramid level: position on the input grid, regression range, stride."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def _points(level_lengths: tuple[int, ...], strides: tuple[int, ...],
            ranges: tuple[tuple[float, float], ...]) -> torch.Tensor:
    rows = []
    for n, s, (lo, hi) in zip(level_lengths, strides, ranges):
        t = torch.arange(n, dtype=torch.float32) * s
        rows.append(torch.stack([t, torch.full_like(t, lo), torch.full_like(t, hi), torch.full_like(t, s)], 1))
    return torch.cat(rows)


def make_points(level_lengths, strides, ranges, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(sum T_l, 4)``: ``[t, range_low, range_high, stride]`` with ``t = i * stride`` (level-0 grid units)
    and the regression range in level-0 grid units too. Cached per layout: built once per length."""
    pts = _points(tuple(int(n) for n in level_lengths), tuple(int(s) for s in strides),
                  tuple((float(lo), float(hi)) for lo, hi in ranges))
    return pts.to(device)
