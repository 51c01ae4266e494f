"""extract_keyframes through the CLI on a tiny AVA-style dataset: what each keyframe record holds, that
adding a keyframe extracts only it, and that a keyframe beyond its video's end fails alone (exit 1).

Two generated videos (12 fps, 5 s and 3 s), the 15-minute-cut convention (``timestamp_offset_s: 900``:
timestamp 0901 is second 1 of the file) and the tiny seeded SlowFast of ``demo_ava`` on 32-pixel frames.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_decoding import make_video

from extractors.decoding import DecodeSpec, decode_video
from extractors.preprocess import FramePreprocessor
from extractors.presets import resolve_preset
from extractors.registry import build_backbone
from extractors.samplers import KeyframeSampler
from pipeline.store import open_stage_store
from pipeline.store.loader import RecordReader

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"preset": "demo_ava", "size": 32}
LABELMAP = 'item {\n  name: "stand"\n  id: 12\n}\nitem {\n  name: "carry"\n  id: 14\n}\n'


def rows(*keyframes: tuple[str, int]) -> str:
    return "".join(f"{v},{ts:04d},0.1,0.2,0.5,0.9,12,0\n{v},{ts:04d},0.1,0.2,0.5,0.9,14,0\n" for v, ts in keyframes)


def cli(cache: Path, manifest: Path, *sets: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--cache-dir", str(cache), "--json", "run",
                           "extract_keyframes", "--dataset", str(manifest), "--workers", "1",
                           *(arg for s in sets for arg in ("--set", s))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    out = json.loads(proc.stdout)
    (stage,) = out["stages"]
    stage["rc"] = proc.returncode
    return stage


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ava_tiny")
    (root / "videos").mkdir()
    make_video(root / "videos" / "vid_a.mp4", n_frames=60)
    make_video(root / "videos" / "vid-b.mp4", n_frames=36, width=58, height=34)
    (root / "labels.pbtxt").write_text(LABELMAP)
    (root / "train.csv").write_text(rows(("vid_a", 901), ("vid_a", 903), ("vid-b", 902)))
    manifest = root / "tiny_ava.yaml"
    manifest.write_text(f"name: tiny_ava\ntask: detect\nvideos: videos\ntimestamp_offset_s: 900\n"
                        f"labelmap: labels.pbtxt\nannotations: {{train: train.csv}}\nsplits: {{train: train}}\n"
                        f"params:\n  extract_keyframes: {json.dumps(PARAMS)}\n")
    return root, manifest


def test_keyframe_records_hold_the_centred_clip_map_and_context(dataset):
    root, manifest = dataset
    first = cli(root / "cache", manifest)
    assert first["rc"] == 0 and first["items"] == {"total": 3, "done": 3, "skipped": 0, "failed": 0}
    stage_dir = Path(first["dir"])
    reader = RecordReader(stage_dir)
    assert reader.ids == ["vid-b,0902", "vid_a,0901", "vid_a,0903"]
    assert reader.attrs["index"] == "keyframe" and reader.attrs["feature_stride"] == 16
    assert reader.attrs["feature_dim"] == 576 and reader.attrs["timestamp_offset_s"] == 900
    with open_stage_store(stage_dir) as store:
        raw = store.read("vid_a,0903", raw=True)
        assert {k: (v.dtype, v.shape) for k, v in raw.items()} == {"map": (np.float16, (576, 2, 3)),
                                                                 "context": (np.float16, (576, 16))}
        assert store.shape("vid-b,0902") == {"map": (576, 2, 4), "context": (576, 16)}   # 58x34 -> 55x32
    record = reader.read("vid_a,0903")
    attrs = record["attrs"]
    assert (attrs["frame_height"], attrs["frame_width"], attrs["feature_stride"], attrs["time_s"]) == (32, 43, 16, 3)
    # The same clip cut by hand: 16 frames at interval 2 centred on second 3 (frame 36) of the file.
    preset = resolve_preset(PARAMS)
    spec = DecodeSpec.from_preset(preset, decoders=(record["attrs"]["decoder"],))
    events = list(decode_video(str(root / "videos" / "vid_a.mp4"), spec, KeyframeSampler(16, 2, (3.0,))))
    plan = events[0][2]
    assert (plan.frames[plan.clips[0]] == np.arange(20, 52, 2)).all()
    frames = np.concatenate([e[2] for e in events if e[0] == "frames"])
    clip = FramePreprocessor(preset, torch.device("cpu"))(frames)[torch.from_numpy(plan.clips[0])]
    with torch.inference_mode():
        fmap, context = build_backbone("slowfast", **preset.backbone_kwargs).forward_keyframe(
            clip.permute(1, 0, 2, 3)[None])
    np.testing.assert_allclose(record["map"], fmap[0].half().float().numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(record["context"], context[0].half().float().numpy(), rtol=2e-3, atol=2e-3)


def test_an_added_keyframe_alone_is_extracted_and_one_beyond_the_end_fails_alone(dataset):
    root, manifest = dataset
    cache = root / "cache"
    stage_dir = Path(cli(cache, manifest)["dir"])
    before = {p.name: p.stat().st_mtime_ns for p in (stage_dir / "items").iterdir()}
    assert len(before) == 3
    with open(root / "train.csv", "a") as f:
        f.write(rows(("vid_a", 904)))
    added = cli(cache, manifest)
    assert added["rc"] == 0 and added["dir"] == str(stage_dir)          # the same store, one more record
    assert added["items"] == {"total": 4, "done": 1, "skipped": 3, "failed": 0}
    after = {p.name: p.stat().st_mtime_ns for p in (stage_dir / "items").iterdir()}
    assert {k: v for k, v in after.items() if k in before} == before and set(after) - set(before) == {"vid_a,0904.json"}

    with open(root / "train.csv", "a") as f:
        f.write(rows(("vid-b", 910), ("vid-b", 901)))                    # second 10 of a 3 s video
    beyond = cli(cache, manifest)
    assert beyond["rc"] == 1
    assert beyond["items"] == {"total": 6, "done": 1, "skipped": 4, "failed": 1}
    assert [(f["id"], f["kind"]) for f in beyond["failures"]] == [("vid-b,0910", "beyond_end")]
    logged = [json.loads(line) for line in (stage_dir / "failures.jsonl").read_text().splitlines()]
    assert [entry["id"] for entry in logged] == ["vid-b,0910"]
    assert RecordReader(stage_dir).ids == ["vid-b,0901", "vid-b,0902", "vid_a,0901", "vid_a,0903", "vid_a,0904"]
    # `pipeline verify` checks keyframe stores against their records too (shapes per field).
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--cache-dir", str(cache), "--json", "verify"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    (store,) = json.loads(proc.stdout)["stores"]
    assert proc.returncode == 0 and store["dir"] == str(stage_dir) and store["videos"] == 5


def test_videomae_keyframes_drop_the_partial_patch_and_keep_the_token_steps(dataset):
    """ava_videomae's sampling (16 frames at interval 4) on the tiny ViT: 32x43 frames give a 2x2 token
    map (the 11 columns past the last whole patch are dropped, as the patch convolution drops them) and
    one context token per tubelet step (8)."""
    root, manifest = dataset
    (root / "vit.csv").write_text(rows(("vid_a", 901)))
    vit_manifest = root / "tiny_ava_vit.yaml"
    vit_manifest.write_text(manifest.read_text().replace("name: tiny_ava", "name: tiny_ava_vit")
                            .replace("train.csv", "vit.csv"))
    out = cli(root / "cache_vit", vit_manifest, "extract_keyframes.preset=ava_videomae",
              "extract_keyframes.backbone_kwargs={tiny: true}")
    assert out["rc"] == 0, out
    reader = RecordReader(Path(out["dir"]))
    assert reader.attrs["feature_dim"] == 64 and reader.attrs["feature_stride"] == 16
    record = reader.read("vid_a,0901")
    assert record["map"].shape == (64, 2, 2) and record["context"].shape == (64, 8)
    assert (record["attrs"]["frame_height"], record["attrs"]["frame_width"]) == (32, 43)


def test_a_dataset_without_keyframes_is_refused_before_any_work(tmp_path):
    (tmp_path / "videos").mkdir()
    manifest = tmp_path / "loc.yaml"
    manifest.write_text(f"name: loc\ntask: localize\nvideos: {tmp_path / 'videos'}\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--cache-dir", str(tmp_path / "cache"), "run",
                           "extract_keyframes", "--dataset", str(manifest)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "loc.yaml: a stage per keyframe needs a detect dataset" in proc.stderr


def test_a_backbone_without_a_feature_map_is_refused_before_a_store_is_made(dataset):
    root, manifest = dataset
    cache = root / "cache_i3d"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--cache-dir", str(cache), "run", "extract_keyframes",
                           "--dataset", str(manifest), "--set", "extract_keyframes.preset=demo",
                           "--set", "extract_keyframes.crop=none"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "extract_keyframes: backbone I3D gives no feature map" in proc.stderr
    assert not list(cache.glob("extract_keyframes/*/features.*"))
