"""Optical flow for I3D's flow stream: the public clip/quantise/scale convention, motion recovered on
generated videos with a known translation and rotation (tiny trained RAFT; TV-L1 where OpenCV's contrib
module is installed), one flow computation per consecutive frame pair shared by all overlapping clips,
and the two streams' order and dimensions through the engine and the CLI."""

from __future__ import annotations

import dataclasses
import fractions
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from extractors.decoding import DecodeSpec, decode_video
from extractors.flow import FlowComputer, StreamFrames, to_unit_range, tvl1_factory
from extractors.preprocess import FramePreprocessor
from extractors.presets import FlowSpec, resolve_preset
from extractors.registry import build_backbone
from extractors.stage import ExtractJob, run_job
from pipeline.context import Item
from pipeline.errors import ConfigError
from pipeline.store import open_stage_store
from pipeline.store.presets import IMPORT_PRESETS

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
TINY = FlowSpec(arch="tiny", iters=12)
# Tolerance on the median end-point error of a global motion: the tiny RAFT's held-out EPE on its
# synthetic training distribution is 0.73 px (tools/train_raft_tiny.py prints it; borders included);
# on these H.264 videos of a texture it never saw, the median error is 0.4-0.75 px. 1 px keeps that
# margin and is still under a third of the smallest translation tested (|(3, -2)| = 3.6 px), so a
# network that recovered nothing (error = the motion itself) fails clearly.
TOL_PX = 1.0


def field(x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """A smooth random colour field defined everywhere: sums of plane waves (wavelengths 8-32 px),
    so any moved copy of it is exact, with no resampling."""
    rng = np.random.default_rng(seed)
    out = np.zeros(x.shape + (3,))
    for c in range(3):
        for _ in range(10):
            angle, wavelength, phase = rng.uniform(0, np.pi), rng.uniform(8, 32), rng.uniform(0, 2 * np.pi)
            k = 2 * np.pi / wavelength
            out[..., c] += np.sin(k * (np.cos(angle) * x + np.sin(angle) * y) + phase)
    lo, hi = out.min(), out.max()
    return (out - lo) / (hi - lo) * 255


def moving_video(path: Path, n_frames: int, motion, fps: int = 12) -> Path:
    """Frame t shows the field moved by ``motion(t, x, y) -> (x0, y0)``: the point of frame 0 seen at (x, y)."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"crf": "10"})
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, fps)
        for t in range(n_frames):
            x0, y0 = motion(t, xs, ys)
            frame = av.VideoFrame.from_ndarray(np.round(field(x0, y0)).astype(np.uint8), format="rgb24")
            frame.pts = t
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def translation(dx: float, dy: float):
    return lambda t, x, y: (x - dx * t, y - dy * t)


def rotation(deg_per_frame: float):
    c = (SIZE - 1) / 2

    def motion(t, x, y):   # frame t = frame 0 rotated by t * deg about the centre
        a = -math.radians(deg_per_frame * t)
        return (math.cos(a) * (x - c) - math.sin(a) * (y - c) + c, math.sin(a) * (x - c) + math.cos(a) * (y - c) + c)
    return motion


def decoded(path: Path) -> np.ndarray:
    spec = DecodeSpec(fps=None, clip_len=2, frame_interval=1, stride=1, tail="drop", resize="short_side",
                      size=(SIZE,), decoders=("pyav",))
    return np.concatenate([e[2] for e in decode_video(str(path), spec) if e[0] == "frames"])


def pixel_flows(frames: np.ndarray, spec: FlowSpec) -> torch.Tensor:
    """Flow in pixels: unscaled by a bound no motion reaches."""
    flows = FlowComputer(dataclasses.replace(spec, bound=1000.0), torch.device("cpu")).clip_flows(frames)
    return flows * 1000.0


def test_clip_quantise_and_scale_follow_the_jpeg_pipelines():
    flow = torch.tensor([-50.0, -20.0, -7.3, 0.0, 0.05, 19.9, 20.0, 33.0])
    torch.testing.assert_close(to_unit_range(flow, 20.0, False), torch.clamp(flow, -20, 20) / 20)
    q = to_unit_range(flow, 20.0, True)
    levels = (q + 1) * 255 / 2                       # what the JPEG stored
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert q[0] == q[1] == -1.0 and q[-1] == q[-2] == 1.0
    assert (q - flow.clamp(-20, 20) / 20).abs().max() <= 1 / 255 + 1e-6      # half a level of 2/255
    assert q[3].item() == pytest.approx(128 * 2 / 255 - 1, abs=1e-6)            # zero flow -> level 128


@pytest.mark.parametrize("dx,dy", [(3.0, -2.0), (-4.0, 1.5)])
def test_tiny_raft_recovers_a_global_translation(tmp_path, dx, dy):
    frames = decoded(moving_video(tmp_path / "t.mp4", 6, translation(dx, dy)))
    flows = pixel_flows(frames, TINY)
    assert flows.shape == (5, 2, SIZE, SIZE)
    inner = flows[:, :, 8:-8, 8:-8]        # content enters and leaves at the borders
    median = inner.flatten(2).median(dim=2).values
    assert (median - torch.tensor([dx, dy])).norm(dim=1).max() < TOL_PX, median


def test_tiny_raft_recovers_a_rotation(tmp_path):
    deg = 4.0
    frames = decoded(moving_video(tmp_path / "r.mp4", 4, rotation(deg)))
    flows = pixel_flows(frames, TINY)
    c = (SIZE - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    a = math.radians(deg)
    expected = torch.stack([math.cos(a) * (xs - c) - math.sin(a) * (ys - c) + c - xs,
                            math.sin(a) * (xs - c) + math.cos(a) * (ys - c) + c - ys])
    inner = (slice(None), slice(None), slice(12, -12), slice(12, -12))
    epe = (flows - expected)[inner].norm(dim=1)
    assert expected[inner[1:]].norm(dim=0).max() > 1.9                      # up to 1.9 px at the inner corners
    assert epe.median() < TOL_PX, epe.median()
    # Rotation, not translation: the right side moves down and the left side up, by the right amount.
    def swing(f):
        return (f[..., 1, 20:44, 40:52].mean() - f[..., 1, 20:44, 12:24].mean()).item()
    assert swing(flows) == pytest.approx(swing(expected), rel=0.2)          # 1.95 px expected


def test_tvl1_recovers_a_global_translation_when_opencv_contrib_is_installed(tmp_path):
    try:
        tvl1_factory()
    except ConfigError:
        pytest.skip("OpenCV's contrib module is not installed")
    frames = decoded(moving_video(tmp_path / "t.mp4", 3, translation(3.0, -2.0)))
    flows = pixel_flows(frames, FlowSpec(estimator="tvl1"))
    median = flows[:, :, 8:-8, 8:-8].flatten(2).median(dim=2).values
    assert (median - torch.tensor([3.0, -2.0])).norm(dim=1).max() < 0.5, median


def test_tvl1_without_opencv_contrib_is_one_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ConfigError, match=r"^extract\.flow\.estimator: tvl1 needs OpenCV's contrib module "
                                          r"\(cv2\.optflow\.DualTVL1OpticalFlow_create\); pip install "
                                          r"opencv-contrib-python-headless"):
        FlowComputer(FlowSpec(estimator="tvl1"), torch.device("cpu"))


def test_stream_frames_equal_the_whole_video_flow_whatever_the_chunks():
    """Chunks of any size give the frames a single pass over the whole video gives: flow i = i -> i+1,
    the last frame repeating the flow before it, RGB first."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (11, 40, 48, 3), dtype=np.uint8)
    preset = resolve_preset({"preset": "demo", "size": 40, "crop": [32, 40], "streams": "both"})
    prep = FramePreprocessor(preset, torch.device("cpu"))
    whole = FlowComputer(preset.flow, torch.device("cpu")).clip_flows(frames)[:, :, 4:36, 4:44]
    expected = torch.cat([prep(frames), torch.cat([whole, whole[-1:]])], 1)
    for cuts in ([11], [1, 10], [3, 1, 7], [5, 5, 1]):
        flow = FlowComputer(preset.flow, torch.device("cpu"), batch_size=3)
        stream = StreamFrames(prep, "both", flow, preset.crop)
        held, out, start = stream.begin(), [], 0
        for n in cuts:
            out.append(stream.push(held, frames[start:start + n]))
            start += n
        out.append(stream.end(held))
        torch.testing.assert_close(torch.cat(out), expected)
        assert flow.pairs == 10


def run(tmp_path: Path, path: Path, streams: str, **params):
    params = {"preset": "demo", "size": 64, "crop": 64, "streams": streams, "store": "zarr",
              "dtype": "float32", **params}
    out = tmp_path / f"out_{streams}_{len(params)}"
    job = ExtractJob(params, {"batch_size": 4, "decoders": ["pyav"]}, out, 1, "cpu")
    stats = run_job(job, [Item("v", path, "fp")], lambda item, rec: None,
                    lambda item, kind, msg: pytest.fail(f"{kind}: {msg}"))
    store = open_stage_store(out)
    return stats, store


def test_one_flow_per_frame_pair_and_streams_in_order_through_the_engine(tmp_path):
    """40 frames, 16-frame clips at stride 4: 7 clips, 39 flow computations (not 7 x 15), 40 decoded
    frames; the 2-stream feature is the RGB model's feature then the flow model's on the same flows."""
    path = moving_video(tmp_path / "v.mp4", 40, translation(2.0, 1.0))
    s_rgb, rgb = run(tmp_path, path, "rgb")
    s_both, both = run(tmp_path, path, "both")
    assert (s_rgb.flow_pairs, s_both.flow_pairs) == (0, 39)
    assert s_both.decoded_frames == s_both.native_frames == 40
    assert rgb.shape("v") == (7, 128) and both.shape("v") == (7, 256)
    feats = both.read("v")
    np.testing.assert_allclose(feats[:, :128], rgb.read("v"), rtol=1e-5, atol=1e-6)
    # The flow half: the flow model on clips built by hand from one pass over the decoded frames.
    frames = decoded(path)
    flows = FlowComputer(resolve_preset({"preset": "demo"}).flow, torch.device("cpu")).clip_flows(frames)
    flows = torch.cat([flows, flows[-1:]])
    model = build_backbone("i3d", tiny=True, stream="two_stream")
    clips = torch.stack([flows[4 * i:4 * i + 16] for i in range(7)]).permute(0, 2, 1, 3, 4)
    with torch.no_grad():
        np.testing.assert_allclose(feats[:, 128:], model.flow(clips).numpy(), rtol=1e-4, atol=1e-5)
    assert both.attrs["streams"] == "both" and both.attrs["flow"] == {
        "estimator": "raft", "arch": "tiny", "iters": 6, "bound": 20.0, "quantize": False}
    assert len(both.attrs["flow_checkpoint_sha256"]) == 64 and rgb.attrs["flow_checkpoint_sha256"] is None


def test_thumos_preset_is_two_stream_2048():
    preset = resolve_preset({"preset": "thumos_i3d"})
    assert (preset.streams, preset.flow.bound, preset.flow.quantize) == ("both", 20.0, False)
    # A fresh extraction and an import of the public features have the same layout and time axis.
    public = IMPORT_PRESETS["thumos_i3d"]
    assert build_backbone("i3d", stream="two_stream").feature_dim == public.feature_dim == 2048
    assert (preset.fps, preset.stride, preset.clip_len, preset.frame_interval, preset.tail) == \
        (public.fps, public.stride, public.clip_len, public.frame_interval, public.tail)
    assert resolve_preset({"preset": "demo"}).streams == "rgb"
    with pytest.raises(ConfigError, match="extract.streams: 'both' needs the i3d backbone"):
        resolve_preset({"preset": "anet_tsp", "streams": "both"})
    # The flow section's fields are flat params, as the schema holds them; the rest keep the preset's.
    assert resolve_preset({"preset": "demo", "iters": 3, "bound": None}).flow == FlowSpec(arch="tiny", iters=3)


def cli(cache: Path, manifest: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIPELINE_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "--cache-dir", str(cache), "--json", "run",
                           "extract", "--dataset", str(manifest), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_selects_streams_and_refuses_a_full_raft_without_weights(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    moving_video(videos / "a.mp4", 24, translation(1.0, 0.0))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: m\ntask: localize\nvideos: {videos}\nparams:\n  extract: {{preset: demo}}\n")
    proc = cli(tmp_path / "cache", manifest, "--set", "extract.streams=both", "--set", "extract.flow.quantize=true")
    assert proc.returncode == 0, proc.stderr
    (report,) = json.loads(proc.stdout)["stages"]
    store = open_stage_store(Path(report["dir"]))
    assert store.shape("a") == (3, 256) and store.attrs["flow"]["quantize"] is True
    refused = cli(tmp_path / "cache", manifest, "--set", "extract.streams=flow", "--set", "extract.flow.arch=large")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "extract.flow_weights: RAFT large with random weights gives no flow" in refused.stderr
    assert "raft-things.pth" in refused.stderr
