"""The demo dataset: short generated videos with known, visual, temporal actions.

Each video is a background (drifting noise, a shifting colour gradient or a grey level that slowly
brightens and darkens) on which a few action
instances happen, one at a time. The
class is in the motion, not in a still frame: a square sweeping left to right (``sweep``), a disc
whose radius pulses (``pulse``), a bar spinning about its centre (``spin``), a block blinking
between two colours (``blink``). Colours, positions, speeds and durations vary per instance.

Everything is drawn with seeded numpy and written with PyAV as H.264 (libx264) mp4, with an
ActivityNet-style JSON of the segments. Generation happens once, into a temporary directory that
is renamed into place when complete, so a crash never leaves a dataset that looks complete.

``events: onsets`` in the spec annotates the same videos with point events instead: each action's
first frame as ``{"timestamp", "label"}`` (``onsets.json`` beside ``annotations.json``, derived from
it). ``events`` does not enter the videos: a segment and a point dataset of one spec share them.

The data depends on the spec and this file only (no stray files on the machine): the same spec gives
the same frames everywhere. It lives in a subdirectory named after the generator version (``g2``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from pipeline.context import build_dir_atomic, write_json_atomic
from pipeline.errors import ConfigError
from pipeline.schema import Range, build

# Bump when the drawn videos or their annotations change for the same spec.
GENERATOR_VERSION = 3

CLASSES = ("sweep", "pulse", "spin", "blink")
BACKGROUNDS = ("noise", "gradient", "flat")
EVENTS = ("segments", "onsets")


Count = Annotated[int, Range(ge=0, le=10000, why="a demo, not a benchmark")]
Seconds = Annotated[float, Range(gt=0, le=3600)]
# One video's frames are drawn in memory as float32 before encoding: bound them well under a small machine's RAM.
MAX_VIDEO_BYTES = 2 << 30


@dataclass(frozen=True)
class DemoSpec:
    """The `generate:` block of a demo manifest, validated once (bounds on the fields, then the whole)."""

    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 0
    train_videos: Count = 24
    test_videos: Count = 8
    duration_s: tuple[Seconds, Seconds] = (20.0, 40.0)
    fps: Annotated[int, Range(ge=2, le=120)] = 12
    size: Annotated[int, Range(ge=32, le=1024)] = 64
    classes: tuple[Literal[CLASSES], ...] = CLASSES
    instances: tuple[Annotated[int, Range(ge=1, le=100)], Annotated[int, Range(ge=1, le=100)]] = (2, 5)
    action_s: tuple[Seconds, Seconds] = (3.0, 8.0)
    min_gap_s: Annotated[float, Range(ge=0, le=3600)] = 1.0
    backgrounds: tuple[Literal[BACKGROUNDS], ...] = BACKGROUNDS
    events: Literal[EVENTS] = "segments"   # the annotations: segments, or each action's onset as a point

    @classmethod
    def from_dict(cls, spec: dict) -> "DemoSpec":
        made = build(cls, spec, "generate", "unknown key")
        made._check()
        return made

    def _check(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"generate.{field}: {why} (got {getattr(self, field)!r})")

        if self.train_videos + self.test_videos == 0:
            raise bad("train_videos", "the dataset needs at least one video")
        if self.size % 2:
            raise bad("size", "must be even (H.264 in yuv420p)")
        for name in ("duration_s", "instances", "action_s"):
            pair = getattr(self, name)
            if not pair[0] <= pair[1]:
                raise bad(name, "must be [low, high] with low <= high")
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise bad("classes", f"a non-empty list of distinct names from {', '.join(CLASSES)}")
        if not self.backgrounds:
            raise bad("backgrounds", f"a non-empty list from {', '.join(BACKGROUNDS)}")
        if self.instances[0] * self.action_s[0] + (self.instances[0] + 1) * self.min_gap_s > self.duration_s[0]:
            raise bad("instances", "the fewest, shortest instances and their gaps do not fit the shortest video")
        video_bytes = self.duration_s[1] * self.fps * self.size ** 2 * 3 * 4
        if video_bytes > MAX_VIDEO_BYTES:
            raise bad("duration_s", f"the longest video at fps {self.fps} and size {self.size} is "
                                    f"{video_bytes / 2**30:.1f} GiB of frames in memory; at most "
                                    f"{MAX_VIDEO_BYTES / 2**30:.0f} GiB (shorter videos, a lower fps or size)")


def ensure_generated(spec: dict, out_dir: Path) -> tuple[Path, Path]:
    """Generate the demo dataset described by ``spec`` under ``out_dir`` unless it is already there.

    Returns ``(videos_dir, annotations_json)``: the segments' file, or with ``events: onsets`` the
    point events' file. Safe against crashes (temporary directory renamed in when complete, files
    written atomically) and against a concurrent generation of the same dataset (the first rename wins).
    """
    demo = DemoSpec.from_dict(dict(spec or {}))
    variant = f"g{GENERATOR_VERSION}"
    final = Path(out_dir) / variant
    videos, annotations = final / "videos", final / "annotations.json"
    # the videos and segments of the spec whatever its events: the same files for both kinds
    segments_spec = replace(demo, events="segments")
    build_dir_atomic(final, lambda tmp: _generate(segments_spec, tmp), lambda d: (d / "annotations.json").is_file())
    if demo.events == "onsets":
        onsets = final / "onsets.json"
        if not onsets.is_file():
            write_json_atomic(onsets, onset_annotations(json.loads(annotations.read_text())))
        return videos, onsets
    return videos, annotations


def onset_annotations(doc: dict) -> dict:
    """The generator's segment annotations -> point events at each segment's start (its first frame)."""
    database = {vid: {**entry, "annotations": [{"timestamp": a["segment"][0], "label": a["label"],
                                                "label_id": a["label_id"]} for a in entry["annotations"]]}
                for vid, entry in doc["database"].items()}
    return {**doc, "events": "onsets", "database": database}


def _generate(demo: DemoSpec, out: Path) -> None:
    (out / "videos").mkdir(parents=True)
    plans = _plan(demo)
    database = {}
    for plan in plans:
        frames = _render(demo, plan)
        _encode(frames, demo.fps, out / "videos" / f"{plan['id']}.mp4")
        database[plan["id"]] = {
            "subset": plan["subset"],
            "duration": plan["n_frames"] / demo.fps,
            "fps": float(demo.fps),
            "background": plan["background"],
            "annotations": [
                {"segment": [f0 / demo.fps, f1 / demo.fps], "label": demo.classes[c], "label_id": c}
                for (f0, f1), c in zip(plan["frames"], plan["labels"])
            ],
        }
    doc = {
        "version": f"demo-g{GENERATOR_VERSION}",
        "generator": {
            # events left out: this file is the same for both kinds (onsets.json says "events")
            "spec": {f.name: getattr(demo, f.name) for f in fields(demo) if f.name != "events"},
            "backgrounds_used": sorted({p["background"] for p in plans}),
        },
        "database": database,
    }
    (out / "annotations.json").write_text(json.dumps(doc, indent=1, sort_keys=True))


def _plan(demo: DemoSpec) -> list[dict]:
    """Decide every video's length, background and instances (frames and labels), per split."""
    rng = np.random.default_rng([demo.seed, 0])
    plans = []
    for subset, count in (("train", demo.train_videos), ("test", demo.test_videos)):
        split_plans = []
        for i in range(count):
            n_frames = int(round(rng.uniform(*demo.duration_s) * demo.fps))
            k = int(rng.integers(demo.instances[0], demo.instances[1] + 1))
            lengths = np.round(rng.uniform(*demo.action_s, size=k) * demo.fps).astype(int)
            gap = int(np.ceil(demo.min_gap_s * demo.fps))
            while k > demo.instances[0] and lengths.sum() + (k + 1) * gap > n_frames:
                k, lengths = k - 1, lengths[:-1]
            lengths = np.minimum(lengths, (n_frames - (k + 1) * gap) // k)
            # Free frames shared among the k+1 gaps at random; each gap keeps its minimum.
            free = n_frames - lengths.sum() - (k + 1) * gap
            gaps = gap + np.floor(rng.dirichlet(np.ones(k + 1)) * free).astype(int)
            starts = np.cumsum(gaps[:-1]) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            background = demo.backgrounds[i % len(demo.backgrounds)]
            split_plans.append({
                "id": f"demo_{subset}_{i:03d}",
                "subset": subset,
                "n_frames": n_frames,
                "frames": [(int(s), int(s + n)) for s, n in zip(starts, lengths)],
                "background": background,
                "seed": [demo.seed, 1 + len(plans) + len(split_plans)],
            })
        # Labels dealt from a shuffled, evenly repeated class list: every class gets its share.
        n_instances = sum(len(p["frames"]) for p in split_plans)
        labels = rng.permutation(np.resize(np.arange(len(demo.classes)), n_instances))
        offset = 0
        for p in split_plans:
            p["labels"] = [int(c) for c in labels[offset: offset + len(p["frames"])]]
            offset += len(p["frames"])
        plans += split_plans
    return plans


# ---- drawing -----------------------------------------------------------------------------------

def _render(demo: DemoSpec, plan: dict) -> np.ndarray:
    """All frames of one video, (T, S, S, 3) uint8."""
    rng = np.random.default_rng(plan["seed"])
    frames = _background(plan["background"], plan["n_frames"], demo, rng)
    for (f0, f1), label in zip(plan["frames"], plan["labels"]):
        t = np.arange(f1 - f0, dtype=np.float32) / demo.fps
        name = demo.classes[label]
        mask = _ACTIONS[name](t, demo.size, rng)
        colour = _colour(name, rng)
        alpha = mask[..., None]
        frames[f0:f1] = frames[f0:f1] * (1 - alpha) + colour * alpha
    return np.clip(frames, 0, 255).astype(np.uint8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): (1, S, 1) rows and (1, 1, S) columns."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :, None], c[None, None, :]


def _soft(d: np.ndarray, size: int) -> np.ndarray:
    """Coverage of a shape from its signed distance (negative inside), antialiased over a pixel."""
    return np.clip(0.5 - d * size, 0.0, 1.0)


# Each class keeps its colour family (jittered per instance): the features come from a tiny
# random-init network, whose pooled responses carry colour far better than motion direction.
_HUES = {"sweep": (235, 60, 50), "pulse": (60, 225, 70), "spin": (70, 110, 255), "blink": (245, 225, 60)}


def _colour(label: str, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(_HUES[label], np.float32) + rng.uniform(-20, 20, 3), 0, 255).astype(np.float32)


def _sweep(t, size, rng):
    """A square crossing the frame from left to right, again and again, at a fixed height."""
    half = rng.uniform(0.16, 0.22)
    period = rng.uniform(1.2, 2.0)
    y0 = rng.uniform(half, 1 - half)
    # Always whole in view: enters at the left edge, leaves at the right, starts again.
    x = half + (1 - 2 * half) * ((t / period + rng.uniform()) % 1.0)
    ys, xs = _grid(size)
    d = np.maximum(np.abs(ys - y0), np.abs(xs - x[:, None, None])) - half
    return _soft(d, size)


def _pulse(t, size, rng):
    """A disc that grows and shrinks in place."""
    cy, cx = rng.uniform(0.3, 0.7, 2)
    period = rng.uniform(0.8, 1.4)
    radius = 0.2 + 0.13 * np.sin(2 * np.pi * (t / period + rng.uniform()))
    ys, xs = _grid(size)
    d = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2) - radius[:, None, None]
    return _soft(d, size)


def _spin(t, size, rng):
    """A long bar turning about its centre."""
    cy, cx = rng.uniform(0.4, 0.6, 2)
    turns_per_s = rng.uniform(0.4, 0.8) * rng.choice([-1, 1])
    angle = 2 * np.pi * (turns_per_s * t + rng.uniform())
    ys, xs = _grid(size)
    dy, dx = ys - cy, xs - cx
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    along, across = dx * cos + dy * sin, -dx * sin + dy * cos
    d = np.maximum(np.abs(along) - 0.38, np.abs(across) - 0.07)
    return _soft(d, size)


def _blink(t, size, rng):
    """A block switching on and off at a few hertz (its colour is the object; off shows background)."""
    h, w = rng.uniform(0.3, 0.45, 2)
    y0, x0 = rng.uniform(0, 1 - h), rng.uniform(0, 1 - w)
    hz = rng.uniform(2.0, 3.0)
    on = ((t * hz + rng.uniform()) % 1.0 < 0.5).astype(np.float32)
    ys, xs = _grid(size)
    inside = ((ys >= y0) & (ys < y0 + h) & (xs >= x0) & (xs < x0 + w)).astype(np.float32)
    return on[:, None, None] * inside


_ACTIONS = {"sweep": _sweep, "pulse": _pulse, "spin": _spin, "blink": _blink}


def _background(kind: str, n: int, demo: DemoSpec, rng: np.random.Generator) -> np.ndarray:
    """(T, S, S, 3) float32 background, kept in a mid range so the shapes read on it."""
    size = demo.size
    ys, xs = _grid(size)
    t = np.arange(n, dtype=np.float32)[:, None, None, None]
    if kind == "noise":
        # Blotchy texture (coarse noise blown up) drifting slowly, plus a little per-frame grain.
        # Mostly grey levels with a faint tint, so the shapes' colours stay the strongest colours.
        coarse = rng.uniform(60, 125, (size // 8, size // 8, 1)) + rng.uniform(-10, 10, (size // 8, size // 8, 3))
        coarse = coarse.astype(np.float32)
        texture = np.repeat(np.repeat(coarse, 8, 0), 8, 1)
        shift = (np.arange(n) * rng.uniform(0.05, 0.2)).astype(int) % size
        rows = (np.arange(size)[None, :] + shift[:, None]) % size
        frames = texture[rows]
        grain = np.random.default_rng(rng.integers(1 << 31)).normal(0, 4, (n, 1, 1, 1)).astype(np.float32)
        return frames + grain
    if kind == "flat":
        # One grey level breathing slowly: the background of a plain wall under changing light.
        level = rng.uniform(50, 120) + 12 * np.sin(2 * np.pi * t / (rng.uniform(6, 12) * demo.fps) + rng.uniform(0, 6))
        return np.broadcast_to(level, (n, size, size, 3)).astype(np.float32)
    # gradient
    a, b = rng.uniform(20, 140, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None]
    phase = np.sin(2 * np.pi * t / (rng.uniform(8, 16) * demo.fps))  # slow, so it is not an action
    ramp = ramp + 0.25 * phase
    return (a + (b - a) * np.clip(ramp, 0, 1)).astype(np.float32)


def to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3H/2, W) yuv420p planes (BT.601, limited range, 2x2 chroma means),
    in integer arithmetic. Done here rather than by swscale inside the encoder: swscale's output varied
    between two processes on one machine (one demo video in 44 differed by a grey level between two
    fresh clones, and with it the demo's mAP)."""
    rgb = frames.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # coefficients x 2^16, rounded (ITU-R BT.601: 219 / 224 levels)
    y = (16 << 16) + 16829 * r + 33039 * g + 6416 * b
    cb = (128 << 16) - 9714 * r - 19070 * g + 28784 * b
    cr = (128 << 16) + 28784 * r - 24103 * g - 4681 * b
    n, h, w = r.shape

    def down(c: np.ndarray) -> np.ndarray:  # mean of each 2x2 block, then rounded to 8 bits
        c = c.reshape(n, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
        return ((c + (1 << 17)) >> 18).clip(0, 255).astype(np.uint8)

    out = np.empty((n, h * 3 // 2, w), np.uint8)
    out[:, :h] = ((y + (1 << 15)) >> 16).clip(0, 255)
    out[:, h:h + h // 4] = down(cb).reshape(n, h // 4, w)
    out[:, h + h // 4:] = down(cr).reshape(n, h // 4, w)
    return out


def _encode(frames: np.ndarray, fps: int, path: Path) -> None:
    """H.264 mp4 through PyAV's libx264, single-threaded (x264 is integer code: the same input gives the
    same bitstream) from planes converted by :func:`to_yuv420p`."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "16", "preset": "veryfast", "threads": "1", "g": str(2 * fps)}
        for planes in to_yuv420p(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")))
        container.mux(stream.encode())
