"""Decoding one video into the sampled frames its clips read: decord first, PyAV as the fallback.

- Readers are opened per video inside the calling process (the engine's decode workers, after the
  fork: decord #294) with few threads (decord #246: more than 2 breaks some files).
- Frames are resized at decode time (swscale inside the decoder), so full-size frames never reach
  Python.
- The sampled frames are chosen by presentation timestamps (``frame_rate``), never ``i / avg_fps``.
- Frames are read forward only, in chunks of consecutive indices: each native frame is decoded once,
  however much the clips overlap (decord re-seeks from a keyframe on every backward ``get_batch``).
- When decord cannot open or decode a file, PyAV starts it again from the beginning; the caller gets a
  ``reset`` event and every event says which decoder served the video.
- Rotation metadata (a display matrix, as phones write) is applied as players apply it: frames are
  decoded upright, ``width`` / ``height`` are the displayed ones and ``rotation`` says by how much the
  coded picture was turned. decord 0.6.0 mangles such files (turned and squeezed, or four channels), so
  it declines them and PyAV serves them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from extractors.frame_rate import native_fps, resample_indices
from extractors.preprocess import resize_shape
from extractors.presets import DECODERS, Preset  # DECODERS: named by the extract schema
from extractors.samplers import ClipPlan, GridSampler, TooShort
from pipeline.timemap import TimeGrid

# decord reads these once, when its library loads (decord #248): they must be set before the first
# ``import decord``. The defaults retry a broken end of file 10240 times, which looks like a hang.
os.environ.setdefault("DECORD_EOF_RETRY_MAX", "2048")
os.environ.setdefault("DECORD_REWIND_RETRY_MAX", "8")
os.environ.setdefault("DECORD_DUPLICATE_WARNING_THRESHOLD", "1.0")

# A plan whose first frame lies further in than this (a keyframe minutes into a film) makes PyAV seek
# to the keyframe before it instead of decoding everything from the start.
_SEEK_FRAMES = 250


class DecodeError(Exception):
    """A video that cannot be turned into clips; ``kind`` goes to the failures file."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DecodeSpec:
    """What to decode: frame-rate policy, clip grid, tail rule and the size frames leave the decoder."""

    fps: float | None
    clip_len: int
    frame_interval: int
    stride: int
    tail: str
    resize: str
    size: tuple[int, ...]
    decoders: tuple[str, ...] = DECODERS
    num_threads: int = 1
    chunk_frames: int = 32

    @classmethod
    def from_preset(cls, preset: Preset, **runtime) -> "DecodeSpec":
        """The preset's sampling and decode-time resize; ``runtime``: ``decoders``, ``num_threads``,
        ``chunk_frames``."""
        return cls(fps=preset.fps, clip_len=preset.clip_len, frame_interval=preset.frame_interval,
                   stride=preset.stride, tail=preset.tail, resize=preset.resize, size=tuple(preset.size),
                   **runtime)

    @property
    def grid(self) -> TimeGrid:
        """The clip grid in sampled frames (for counts only: the rate is per video, not known here)."""
        return TimeGrid(fps=self.fps or 1.0, stride=self.stride, clip_len=self.clip_len,
                        frame_interval=self.frame_interval)


@dataclass(frozen=True)
class VideoMeta:
    """What was found and decided about one video before its frames are read."""

    decoder: str
    decoder_version: str
    native_fps: float
    sampled_fps: float
    n_frames: int          # native frames (by timestamp)
    n_sampled: int         # frames on the sampled grid
    n_decode: int          # sampled frames the clips read (the plan's frames)
    n_native_decoded: int  # native frames the decoder goes through to produce them
    n_clips: int
    duration: float
    start_time: float
    width: int
    height: int
    frame_height: int      # after the decode-time resize
    frame_width: int
    rotation: int = 0      # degrees counter-clockwise the coded picture is turned for display


def decode_video(path: str, spec: DecodeSpec, sampler=None) -> Iterator[tuple]:
    """Events for one video: ``("meta", VideoMeta, ClipPlan)``, then ``("frames", position of the first
    in the plan's frames, uint8 array (n, H, W, 3) RGB)`` in order, then ``("done", n_frames_sent)``;
    ``("reset",)`` when a decoder failed after it had sent something and the next one starts over.
    ``sampler`` (``extractors.samplers``) plans the clips; default: the spec's clip grid. Raises
    ``DecodeError`` when every decoder failed (the last decoder's error, naming the others)."""
    sampler = sampler or GridSampler(spec.grid, spec.tail)
    errors: list[str] = []
    last: DecodeError | None = None
    for name in spec.decoders:
        started = False
        reader = None
        try:
            reader = _READERS[name](path, spec)
            meta, plan, native = _plan(reader, spec, sampler)
            yield ("meta", meta, plan)
            started = True
            sent = 0
            for chunk in reader.read(native, spec.chunk_frames):
                yield ("frames", sent, chunk)
                sent += len(chunk)
            if sent < meta.n_decode:
                raise DecodeError("truncated", f"only {sent} of {meta.n_decode} frames could be decoded")
            yield ("done", sent)
            return
        except DecodeError as e:
            last = e
        except Exception as e:  # decoders raise their own types (DECORDError, av.error.*, RuntimeError)
            last = DecodeError("decode_error", f"{type(e).__name__}: {e}")
        finally:
            if reader is not None:
                reader.close()
        errors.append(f"{name}: {last}")
        if last.kind == "too_short":
            break
        if started:
            yield ("reset",)
    assert last is not None
    raise DecodeError(last.kind, "; ".join(reversed(errors)))


def _plan(reader, spec: DecodeSpec, sampler) -> tuple[VideoMeta, ClipPlan, np.ndarray]:
    ts = reader.timestamps
    if len(ts) == 0:
        raise DecodeError("zero_frames", "the video stream has no frames")
    native = native_fps(ts, reader.nominal_fps)
    fps = float(spec.fps or native)
    sampled = resample_indices(ts, fps, native)
    try:
        plan = sampler.plan(len(sampled), fps)
    except TooShort as e:
        raise DecodeError("too_short", str(e)) from None
    wanted = sampled[plan.frames]
    out_h, out_w = reader.out_shape
    meta = VideoMeta(decoder=reader.name, decoder_version=reader.version, native_fps=native,
                     sampled_fps=fps, n_frames=len(ts), n_sampled=len(sampled), n_decode=len(plan.frames),
                     n_native_decoded=int(wanted[-1]) + 1 if len(wanted) else 0,
                     n_clips=plan.n_clips, duration=float(ts[-1] - ts[0] + 1.0 / native),
                     start_time=float(ts[0]), width=reader.width, height=reader.height,
                     frame_height=out_h, frame_width=out_w, rotation=reader.rotation)
    return meta, plan, wanted


def _probe(path: str):
    """Open with PyAV for the stream's size (header only) and a clear error for files without video."""
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise DecodeError("unreadable", f"cannot open: {e}") from None
    if not container.streams.video:
        container.close()
        raise DecodeError("no_video_stream", "the file has no video stream")
    return container


def _display_rotation(container) -> int:
    """Counter-clockwise degrees (0, 90, 180 or 270) the first frame's display matrix turns the coded
    picture; other angles are rare enough to be shown as coded. Decodes that frame, then rewinds."""
    import av

    stream = container.streams.video[0]
    try:
        frame = next(container.decode(stream), None)
        container.seek(0, stream=stream)
    except (av.error.FFmpegError, OSError):
        return 0  # reading the frames reports what is wrong with the file
    angle = int(round(getattr(frame, "rotation", 0) or 0)) % 360 if frame is not None else 0
    return angle if angle in (90, 180, 270) else 0


def _upright(height: int, width: int, rotation: int) -> tuple[int, int]:
    """Displayed (height, width) of a coded picture turned by ``rotation``."""
    return (width, height) if rotation in (90, 270) else (height, width)


def _check_complete(declared: int, readable: int) -> None:
    """A container index (mp4 moov) that lists more frames than can be read: the file was cut."""
    if declared and readable < declared:
        raise DecodeError("truncated", f"the stream declares {declared} frames, only {readable} can be read")


class _PyAVReader:
    name = "pyav"

    def __init__(self, path: str, spec: DecodeSpec):
        import av

        self.version = av.__version__
        self.container = _probe(path)
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = spec.num_threads
        self.stream = stream
        self.rotation = _display_rotation(self.container)
        self.height, self.width = _upright(stream.codec_context.height, stream.codec_context.width, self.rotation)
        if not self.width or not self.height:
            raise DecodeError("unreadable", "the video stream has no frame size")
        self.out_shape = resize_shape(self.height, self.width, spec.resize, spec.size)
        rate = stream.average_rate or stream.guessed_rate
        self.nominal_fps = float(rate) if rate else None
        pts = [p.pts for p in self.container.demux(stream) if p.pts is not None and p.size]
        if not pts:
            raise DecodeError("zero_frames", "the video stream has no frames")
        _check_complete(stream.frames, len(pts))
        self.pts = np.sort(np.asarray(pts, dtype=np.int64))
        self.timestamps = self.pts.astype(np.float64) * float(stream.time_base)
        self.container.seek(0, stream=stream)

    def read(self, native: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
        out_h, out_w = _upright(*self.out_shape, self.rotation)  # the coded picture's orientation
        turns = self.rotation // 90
        counts = np.bincount(native, minlength=int(native[-1]) + 1) if len(native) else np.zeros(0, int)
        buf: list[np.ndarray] = []
        for i, frame in self._frames(int(native[0]) if len(native) else 0):
            if i >= len(counts):
                break
            if counts[i]:
                # One scaling thread: swscale's own pool (PyAV's default) is not fork-safe, and a process
                # that converted frames and then forks decode workers leaves them hung in their first
                # conversion (PyAV 18.1 / FFmpeg 8; tests/test_flow.py decodes in-process, then extracts).
                rgb = frame.to_ndarray(format="rgb24", width=out_w, height=out_h, interpolation="BICUBIC",
                                       threads=1)
                if turns:
                    rgb = np.ascontiguousarray(np.rot90(rgb, turns))
                buf.extend([rgb] * int(counts[i]))
                if len(buf) >= chunk:
                    yield np.stack(buf)
                    buf = []
        if buf:
            yield np.stack(buf)

    def _frames(self, first: int) -> Iterator[tuple[int, object]]:
        """(native index, frame) in presentation order, from frame ``first`` or a frame before it."""
        if first >= _SEEK_FRAMES:
            self.container.seek(int(self.pts[first]), stream=self.stream, backward=True, any_frame=False)
            frames = self.container.decode(self.stream)
            head = next(frames, None)
            at = int(np.searchsorted(self.pts, head.pts)) if head is not None and head.pts is not None else -1
            if 0 <= at <= first and self.pts[at] == head.pts:
                yield at, head
                yield from enumerate(frames, at + 1)
                return
            self.container.seek(0, stream=self.stream)    # landed past it: decode from the start
        yield from enumerate(self.container.decode(self.stream))

    def close(self) -> None:
        self.container.close()


class _DecordReader:
    name = "decord"

    def __init__(self, path: str, spec: DecodeSpec):
        import decord

        self.version = decord.__version__
        self.rotation = 0
        with _probe(path) as container:
            if _display_rotation(container):
                raise DecodeError("rotated", "decord 0.6.0 cannot apply rotation metadata (it turns and squeezes "
                                             "the frames); decoded with pyav instead when it is listed")
            stream = container.streams.video[0]
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            declared = stream.frames
        self.out_shape = resize_shape(self.height, self.width, spec.resize, spec.size)
        out_h, out_w = self.out_shape
        self.vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=spec.num_threads,
                                     width=out_w, height=out_h)
        n = len(self.vr)
        _check_complete(declared, n)
        self.nominal_fps = float(self.vr.get_avg_fps()) if n else None
        self.timestamps = (self.vr.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64)
                           if n else np.zeros(0))

    def read(self, native: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
        for start in range(0, len(native), chunk):
            yield self.vr.get_batch(native[start:start + chunk].tolist()).asnumpy()

    def close(self) -> None:
        # A fresh reader per video, dropped at once: decord's readers grow in memory (decord #197).
        self.vr = None


_READERS = {"decord": _DecordReader, "pyav": _PyAVReader}


def decord_usable() -> bool:
    """decord 0.6.0 predates numpy 2; it is used only when it imports here."""
    try:
        import decord  # noqa: F401
    except Exception:
        return False
    return True


def available_decoders(preferred: tuple[str, ...] = DECODERS) -> tuple[str, ...]:
    return tuple(d for d in preferred if d != "decord" or decord_usable())
