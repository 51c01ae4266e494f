"""Time-mapping presets of public feature sets, for ``pipeline import-features --preset``.

Figures from the sets' releases (see shared/reference/extraction.md section 2). Feature ``i`` sits at
``(stride*i + clip_len*frame_interval/2) / fps`` (pipeline.timemap):
``thumos_i3d`` (4i+8)/fps with the per-video fps of the annotation file, ``anet_tsp`` (16i+8)/15,
``epic_slowfast`` (16i+16)/30.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ImportPreset:
    name: str
    backbone: str
    fps: float | None  # None: each video's own fps from the annotation file (or --fps)
    stride: int
    clip_len: int
    feature_dim: int
    frame_interval: int = 1
    tail: str = "drop"


IMPORT_PRESETS = {p.name: p for p in [
    # ActionFormer's THUMOS14 two-stream I3D: 2048 = rgb[:1024] | flow[1024:], native fps (mostly 30).
    ImportPreset("thumos_i3d", backbone="i3d_two_stream", fps=None, stride=4, clip_len=16, feature_dim=2048),
    # TSP R(2+1)D-34 on ActivityNet, 30 fps video resampled to 15 fps, non-overlapping clips.
    ImportPreset("anet_tsp", backbone="r2plus1d_34_tsp", fps=15.0, stride=16, clip_len=16, feature_dim=512),
    # EPIC-KITCHENS-100 SlowFast R50 8x8 (.npz['feats']), 30 fps, 32-frame windows every 16 frames.
    ImportPreset("epic_slowfast", backbone="slowfast_r50", fps=30.0, stride=16, clip_len=32, feature_dim=2304),
]}


def get_preset(name: str) -> ImportPreset:
    try:
        return IMPORT_PRESETS[name]
    except KeyError:
        raise ConfigError(f"--preset {name}: unknown import preset; known: {', '.join(IMPORT_PRESETS)}") from None
