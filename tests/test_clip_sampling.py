"""Clip sampling and presets: feature counts per preset against the public formulas, the frames
each clip covers, online windows equal to the offline plan, and timestamp-based resampling."""

from __future__ import annotations

import numpy as np
import pytest

from extractors.clip_sampling import ClipWindows, clip_frame_indices, frames_needed
from extractors.samplers import GridSampler, KeyframeSampler, TooShort
from extractors.frame_rate import native_fps, resample_indices, sampled_frame_count
from extractors.presets import PRESETS, resolve_preset
from pipeline.errors import ConfigError
from pipeline.timemap import TimeGrid


def grid_of(preset, fps=30.0) -> TimeGrid:
    return TimeGrid(fps=fps, stride=preset.stride, clip_len=preset.clip_len,
                    frame_interval=preset.frame_interval, offset_frames=preset.offset_frames)


# The feature count each public set documents (shared/reference/extraction.md §1-2).
FORMULAS = {
    "thumos_i3d": lambda f: (f - 16) // 4 + 1,                  # ActionFormer / CMCS
    "thumos_videomae_v2": lambda f: len(range(0, f - 15, 4)),   # extract_tad_feature.py
    "anet_tsp": lambda f: (f - 16) // 16 + 1,                   # TSP at 15 fps
    "epic_slowfast": lambda f: (f - 32) // 16 + 1,
    "demo": lambda f: (f - 16) // 4 + 1 + ((f - 16) % 4 > 0),   # pad: Ego4D's one back-padded window
}


@pytest.mark.parametrize("name", sorted(FORMULAS))   # the grid presets (keyframe presets sample no grid)
def test_features_per_video_match_each_preset_formula(name):
    preset = PRESETS[name]
    for f in (grid_of(preset).span_frames, 47, 100, 101, 331, 5094):
        rows = clip_frame_indices(grid_of(preset), f, preset.tail)
        assert len(rows) == FORMULAS[name](f), (name, f)
        assert rows.shape[1] == preset.clip_len and rows.max() < f


def test_published_counts_and_centres():
    # THUMOS I3D features sit at (4i + 8) / fps, TSP's at (16i + 8) / 15, EPIC's at (16i + 16) / 30.
    p = PRESETS["thumos_i3d"]
    assert np.allclose(grid_of(p, 30.0).centers(3), [8 / 30, 12 / 30, 16 / 30])
    tsp = PRESETS["anet_tsp"]
    assert np.allclose(grid_of(tsp, 15.0).centers(2), [8 / 15, 24 / 15])
    epic = PRESETS["epic_slowfast"]
    assert np.allclose(grid_of(epic, 30.0).centers(2), [16 / 30, 32 / 30])


def test_frame_indices_each_clip_covers():
    grid = TimeGrid(fps=10, stride=3, clip_len=4, frame_interval=2)
    rows = clip_frame_indices(grid, 17, "drop")
    assert rows.tolist() == [[0, 2, 4, 6], [3, 5, 7, 9], [6, 8, 10, 12], [9, 11, 13, 15]]
    assert [grid.frame_span(i) for i in range(4)] == [(0, 8), (3, 11), (6, 14), (9, 17)]
    assert clip_frame_indices(grid, 17, "pad").tolist() == rows.tolist()   # no leftover past the span
    padded = clip_frame_indices(grid, 19, "pad")
    assert padded.tolist()[-1] == [12, 14, 16, 18] and len(padded) == 5
    assert clip_frame_indices(grid, 18, "pad").tolist()[-1] == [12, 14, 16, 17]   # repeats the last frame
    assert clip_frame_indices(grid, 5, "pad").tolist() == [[0, 2, 4, 4]]
    assert clip_frame_indices(grid, 5, "drop").shape == (0, 4)
    assert frames_needed(grid, 17, "drop") == frames_needed(grid, 17, "pad") == 16
    assert frames_needed(grid, 18, "drop") == 16 and frames_needed(grid, 18, "pad") == 18


@pytest.mark.parametrize("tail", ["drop", "pad"])
def test_online_windows_equal_the_offline_plan(tail):
    rng = np.random.default_rng(0)
    grid = TimeGrid(fps=30, stride=4, clip_len=16, frame_interval=2)
    with pytest.raises(TooShort):
        GridSampler(grid, "drop").plan(31, 30.0)
    for n in (31, 32, 33, 90, 141):
        if n == 31 and tail == "drop":
            continue
        plan = GridSampler(grid, tail).plan(n, 30.0)
        assert np.array_equal(plan.frames, np.arange(frames_needed(grid, n, tail)))
        windows, got, received, kept = ClipWindows(plan), [], 0, 0
        while received < len(plan.frames):
            received = min(len(plan.frames), received + int(rng.integers(1, 20)))
            first, rows = windows.ready(received)
            assert first == len(got) and (rows < received).all()
            got += rows.tolist()
            assert windows.keep_from() >= kept
            kept = windows.keep_from()
            assert all(min(r) >= 0 for r in got)
            # Frames before keep_from() are never read again: the buffer stays about one clip long.
            assert windows.keep_from() == (len(got) * grid.stride if len(got) < plan.n_clips else len(plan.frames))
        first, rows = windows.finish()
        got += rows.tolist()
        assert got == clip_frame_indices(grid, n, tail).tolist()


def test_resampling_by_timestamp():
    ts30 = np.arange(61) / 30
    assert resample_indices(ts30, 15.0).tolist() == list(range(0, 61, 2))       # TSP 30 -> 15
    assert np.array_equal(resample_indices(ts30, 30.0), np.arange(61))
    jitter = np.arange(300) * (1001 / 30000) + np.random.default_rng(1).normal(0, 1e-4, 300)
    jitter.sort()
    assert np.array_equal(resample_indices(jitter, native_fps(jitter)), np.arange(300))
    ms_rounded = np.round(np.arange(300) * (1001 / 60000), 3)      # 59.94 fps in a 1/1000 time base
    assert np.array_equal(resample_indices(ms_rounded, native_fps(ms_rounded)), np.arange(300))
    # 25 fps from 30: floor(k * 30 / 25), as TSP's frame-rate conversion.
    assert resample_indices(ts30, 25.0).tolist() == [int(k * 30 / 25) for k in range(51)]
    vfr = np.array([0.0, 0.1, 0.14, 0.18, 0.5, 0.52])
    assert resample_indices(vfr, 10.0).tolist() == [0, 1, 3, 3, 3, 4, 5]
    assert sampled_frame_count(vfr, 10.0, native_fps(vfr)) == 7   # ends at 0.52 + 1/9.6 s


def test_preset_overrides_and_errors():
    p = resolve_preset({"preset": "thumos_i3d", "stride": 8, "fps": None, "crop": None, "weights": None})
    assert (p.stride, p.clip_len, p.crop, p.fps) == (8, 16, (224, 224), None)
    assert resolve_preset({"preset": "anet_tsp", "fps": "native"}).fps is None
    assert resolve_preset({"preset": "demo", "crop": "none"}).crop is None
    assert resolve_preset({"preset": "demo", "size": 32, "crop": 32}).crop == (32, 32)
    assert resolve_preset({"preset": "demo", "backbone_kwargs": {"width": 0.5}}).backbone_kwargs == {
        "tiny": True, "width": 0.5}
    attrs = PRESETS["thumos_i3d"].attrs()
    assert attrs["offset_frames"] == 8 and attrs["fps_policy"] == "native" and attrs["streams"] == "both"
    assert attrs["flow"] == {"estimator": "raft", "arch": "large", "iters": 12, "bound": 20.0, "quantize": False}
    for bad, where in (({"preset": "nope"}, "extract.preset"), ({"preset": "demo", "strid": 2}, "extract.strid"),
                       ({"preset": "demo", "stride": 0}, "stride"), ({"preset": "demo", "tail": "x"}, "tail"),
                       ({"preset": "demo", "crop": 100}, "crop")):
        with pytest.raises(ConfigError, match=where):
            resolve_preset(bad)


def test_keyframe_clips_are_centred_share_frames_and_fail_alone():
    # SlowFast 8x8 as the AVA loaders cut it: 32 frames at interval 2 from centre - 32; 10 s at 30 fps.
    sampler = KeyframeSampler(clip_len=32, frame_interval=2, times=(9.9, 1.0, 12.0, 2.0, -0.5))
    plan = sampler.plan(300, 30.0)
    assert {r: kind for r, (kind, _) in plan.failed.items()} == {2: "beyond_end", 4: "before_start"}
    assert plan.owners.tolist() == [1, 3, 0]                      # time order
    clips = plan.frames[plan.clips]                                # sampled-frame indices per clip
    assert clips[0].tolist() == [0] + list(range(0, 61, 2))       # centre 30: -2 repeats frame 0
    assert clips[1].tolist() == list(range(28, 91, 2))
    assert clips[2].tolist() == list(range(265, 298, 2)) + [299] * 15
    assert len(plan.frames) == len(np.unique(clips))              # shared frames decoded once
    windows, got = ClipWindows(plan), []
    for received in range(1, len(plan.frames) + 1):
        first, rows = windows.ready(received)
        assert first == len(got) and (rows < received).all()
        got += rows.tolist()
    assert got == plan.clips.tolist()
