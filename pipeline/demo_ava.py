"""The AVA-style demo dataset: short generated videos with several actors, context objects, and
action labels of which some depend on relations.

Each video is a calm background with a few small coloured objects and two to four actors (a body
with a head; the box spans a narrow margin on each side where waving arms appear). Actors stand,
walk to random points, walk up to an object, stand touching it, sometimes pick it up and carry it
(held beside the body, outside the box) and put it down, or walk up to another actor. Labels at each
keyframe follow from the geometry at that instant:

- actor-only: ``stand`` / ``walk`` (pose, exclusive: is the actor moving), ``wave`` (its arms flicker);
- relation: ``touch`` (an object beside the box at hand height, within a few pixels, not carried),
  ``carry`` (holds an object), ``approach`` (walks toward an object), ``near_person`` (another actor
  side by side within a few pixels). The object or the other actor lies outside the actor's box, so
  a head that sees only the box cannot tell these apart (it can only guess ``approach`` and ``carry``
  from ``walk``).

Files are in the public AVA layout: CSVs of ``video_id, timestamp, x1, y1, x2, y2, action_id,
person_id`` with timestamps offset by ``timestamp_offset_s`` (the 15-minute cuts start at 900 s), a
pbtxt label map with non-contiguous ids (``label_id:`` syntax), per-split excluded timestamps
(dropped from the GT CSV, kept in the proposals), and person proposals (``..., , score``): ground
truth boxes jittered, a few missed, false positives, and keyframes without ground truth (some videos
start with a few seconds before the actors come in).

Everything is drawn with seeded numpy (integer pixel rectangles, no floating-point rendering) and
encoded losslessly (FFV1 in Matroska, written bit-exact, single-threaded): the same spec gives the
same bytes on every machine, and decoding gives back exactly the drawn frames. The dataset is
generated once into a temporary directory that is renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated

import numpy as np

from pipeline.context import build_dir_atomic
from pipeline.errors import ConfigError
from pipeline.schema import Range, build

# Bump when the drawn videos or the annotation files change for the same spec.
GENERATOR_VERSION = 1

# id -> (name, AVA label type). Ids are non-contiguous on purpose; pose ids are <= 14 as in AVA.
ACTIONS = {
    1: ("stand", "PERSON_MOVEMENT"),
    4: ("walk", "PERSON_MOVEMENT"),
    33: ("wave", "PERSON_MOVEMENT"),
    45: ("touch", "OBJECT_MANIPULATION"),
    52: ("carry", "OBJECT_MANIPULATION"),
    61: ("approach", "OBJECT_MANIPULATION"),
    73: ("near_person", "PERSON_INTERACTION"),
}
ACTOR_ONLY = ("stand", "walk", "wave")
RELATION = ("touch", "carry", "approach", "near_person")
SPLITS = ("train", "val")

# Where the files lie under the generated directory (read by pipeline.datasets).
LAYOUT = {
    "videos": "videos",
    "labelmap": "annotations/demo_ava_actions.pbtxt",
    "annotations": {s: f"annotations/{s}.csv" for s in SPLITS},
    "exclusions": {s: f"annotations/{s}_excluded_timestamps.csv" for s in SPLITS},
    "proposals": {s: f"annotations/{s}_proposals.csv" for s in SPLITS},
}
RECORD = "generation.json"

# Pixel sizes of the drawing (at any frame size: the frame is the world).
BODY_W, BODY_H, HEAD, ARM = (9, 13), (20, 28), 6, 4
OBJECT = (6, 9)
TOUCH_GAP, NEAR_GAP = 2, 2  # pixels between boxes for touch / near_person
SPEED = (14.0, 24.0)  # pixels per second
ACTOR_COLOURS = np.array([(200, 60, 60), (60, 90, 200), (70, 170, 80), (200, 200, 70), (170, 80, 190),
                          (230, 140, 50)], np.int16)
OBJECT_COLOURS = np.array([(40, 230, 230), (230, 40, 200), (20, 20, 20)], np.int16)


Count = Annotated[int, Range(ge=1, le=10000, why="a demo, not a benchmark")]
Pixels = Annotated[int, Range(ge=64, le=4096)]
Fraction01 = Annotated[float, Range(ge=0, le=1)]
# keyframes keep 2 s from either end of a video
Duration = Annotated[float, Range(ge=8, le=3600, why="keyframes keep 2 s from either end")]
Lead = Annotated[float, Range(ge=0, le=3600)]


@dataclass(frozen=True)
class DemoAvaSpec:
    """The ``generate:`` block of a detect demo manifest, validated once (bounds on the fields, then
    the pairs and sizes as a whole)."""

    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 0
    train_videos: Count = 12
    val_videos: Count = 6
    duration_s: tuple[Duration, Duration] = (20.0, 30.0)
    fps: Annotated[int, Range(ge=4, le=120)] = 12
    width: Pixels = 128
    height: Pixels = 96
    actors: tuple[Annotated[int, Range(ge=1, le=20)], Annotated[int, Range(ge=1, le=20)]] = (2, 4)
    objects: tuple[Annotated[int, Range(ge=0, le=20)], Annotated[int, Range(ge=0, le=20)]] = (1, 3)
    timestamp_offset_s: Annotated[int, Range(ge=0)] = 900
    empty_lead_s: tuple[Lead, Lead] = (2.0, 5.0)  # videos with actors coming in late: this long
    empty_lead_fraction: Fraction01 = 0.3
    excluded_fraction: Fraction01 = 0.04  # keyframes listed as excluded
    proposal_jitter: Fraction01 = 0.05  # of the box size, per side
    proposal_miss: Fraction01 = 0.03  # ground-truth boxes the detector misses
    false_positives: Annotated[float, Range(ge=0, le=100)] = 0.3  # per keyframe, on average

    @classmethod
    def from_dict(cls, spec: dict) -> "DemoAvaSpec":
        made = build(cls, spec, "generate", "unknown key")
        made._check()
        return made

    def _check(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"generate.{name}: {why} (got {getattr(self, name)!r})")

        for name in ("width", "height"):
            if getattr(self, name) % 2:
                raise bad(name, "must be an even integer >= 64")
        for name in ("duration_s", "actors", "objects", "empty_lead_s"):
            pair = getattr(self, name)
            if pair[0] > pair[1]:
                raise bad(name, "must be [low, high] with low <= high")


def ensure_generated(spec: dict, out_dir: Path, timestamp_offset_s: float | None = None) -> Path:
    """Generate the dataset of ``spec`` into ``out_dir`` (its files at the paths of ``LAYOUT``) unless a
    complete one of this generator version is there; return ``out_dir``. ``timestamp_offset_s``: the
    manifest's, which must be the one the timestamps are written with. Crash-safe (built in a
    temporary directory renamed in) and safe against a concurrent generation (the first rename wins)."""
    demo = DemoAvaSpec.from_dict(dict(spec or {}))
    if timestamp_offset_s is not None and timestamp_offset_s != demo.timestamp_offset_s:
        raise ConfigError(f"timestamp_offset_s: {timestamp_offset_s:g} differs from the generator's "
                          f"generate.timestamp_offset_s {demo.timestamp_offset_s} (set both alike)")
    final = Path(out_dir)
    build_dir_atomic(final, lambda tmp: _generate(demo, tmp), _complete)  # an older version's data is replaced
    return final


def _complete(root: Path) -> bool:
    try:
        return json.loads((root / RECORD).read_text())["version"] == f"demo_ava-g{GENERATOR_VERSION}"
    except (OSError, ValueError, KeyError):
        return False


def dataset_digest(root: Path) -> str:
    """sha256 over every generated file (relative path and content), the record excluded."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name != RECORD):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _generate(demo: DemoAvaSpec, out: Path) -> None:
    (out / LAYOUT["videos"]).mkdir(parents=True)
    (out / "annotations").mkdir()
    _write_labelmap(out / LAYOUT["labelmap"])
    rng = np.random.default_rng([demo.seed, 0])
    counts = {}
    for split, n_videos in (("train", demo.train_videos), ("val", demo.val_videos)):
        gt_rows, proposal_rows, excluded = [], [], []
        for i in range(n_videos):
            vid = f"{split}_{i:03d}"
            world = _simulate(demo, np.random.default_rng([demo.seed, 1 + SPLITS.index(split), i]))
            _encode(_render(demo, world), demo.fps, out / LAYOUT["videos"] / f"{vid}.mkv")
            gt, proposals, excl = _annotate(demo, world, vid, rng)
            gt_rows += gt
            proposal_rows += proposals
            excluded += excl
        _write_lines(out / LAYOUT["annotations"][split], gt_rows)
        _write_lines(out / LAYOUT["proposals"][split], proposal_rows)
        _write_lines(out / LAYOUT["exclusions"][split], excluded)
        counts[split] = {"videos": n_videos, "gt_rows": len(gt_rows), "proposals": len(proposal_rows),
                         "excluded": len(excluded)}
    record = {"version": f"demo_ava-g{GENERATOR_VERSION}",
              "spec": asdict(demo),
              "counts": counts, "digest": dataset_digest(out)}
    (out / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))


def _write_labelmap(path: Path) -> None:
    path.write_text("".join(f'label {{\n  name: "{name}"\n  label_id: {i}\n  label_type: {kind}\n}}\n'
                            for i, (name, kind) in ACTIONS.items()))


def _write_lines(path: Path, rows: list[str]) -> None:
    path.write_text("".join(r + "\n" for r in rows))


# ---- the world: where everyone is, frame by frame ---------------------------------------------------

@dataclass
class World:
    n_frames: int
    lead: int  # frames before the actors come in
    actor_boxes: np.ndarray  # (A, T, 4) int pixel boxes x1, y1, x2, y2 (x2, y2 exclusive), arms included
    moving: np.ndarray  # (A, T) bool
    waving: np.ndarray  # (A, T) bool
    carrying: np.ndarray  # (A, T) int object index or -1
    approaching: np.ndarray  # (A, T) int object index or -1
    object_pos: np.ndarray  # (O, T, 2) int top-left
    object_size: np.ndarray  # (O,) int
    actor_colour: np.ndarray  # (A, 3)
    object_colour: np.ndarray  # (O, 3)
    background: np.ndarray  # (H, W, 3) uint8

    def object_boxes(self) -> np.ndarray:
        """(O, T, 4) pixel boxes."""
        size = self.object_size[:, None, None]
        return np.concatenate([self.object_pos, self.object_pos + size], axis=2)


def _simulate(demo: DemoAvaSpec, rng: np.random.Generator) -> World:
    W, H, fps = demo.width, demo.height, demo.fps
    T = int(round(rng.uniform(*demo.duration_s) * fps))
    lead = int(round(rng.uniform(*demo.empty_lead_s) * fps)) if rng.uniform() < demo.empty_lead_fraction else 0
    n_actors = int(rng.integers(demo.actors[0], demo.actors[1] + 1))
    n_objects = int(rng.integers(demo.objects[0], demo.objects[1] + 1))
    body_w = rng.integers(BODY_W[0], BODY_W[1] + 1, n_actors)
    body_h = rng.integers(BODY_H[0], BODY_H[1] + 1, n_actors)
    box_w, box_h = body_w + 2 * ARM, body_h + HEAD
    object_size = rng.integers(OBJECT[0], OBJECT[1] + 1, n_objects)
    object_pos = np.zeros((n_objects, T, 2), np.int64)
    for o in range(n_objects):
        object_pos[o] = [rng.integers(2, W - object_size[o] - 2), rng.integers(2, H - object_size[o] - 2)]
    held_by = np.full((n_objects, T), -1, np.int64)
    # float top-left positions of the actors' boxes
    pos = np.zeros((n_actors, T, 2))
    moving = np.zeros((n_actors, T), bool)
    carrying = np.full((n_actors, T), -1, np.int64)
    approaching = np.full((n_actors, T), -1, np.int64)
    waving = np.zeros((n_actors, T), bool)
    for a in range(n_actors):
        limit = np.array([W - box_w[a], H - box_h[a]], float)
        here = rng.uniform([0, 0], limit)
        t, holding, t_pick, leave = 0, -1, 0, False
        while t < T:
            choice = rng.choice(["stand", "walk", "approach", "person"], p=[0.2, 0.4, 0.3, 0.1])
            if leave:  # after standing at an object or a person, walk away
                choice, leave = "walk", False
            speed = rng.uniform(*SPEED) / fps
            if holding >= 0:  # carry it somewhere, stand a moment, put it down
                t, here = _walk(pos[a], moving[a], t, here, rng.uniform([0, 0], limit), speed, T)
                t_drop = min(t + int(rng.integers(fps, 2 * fps)), T)
                pos[a, t:t_drop] = here
                carrying[a, t_pick:t_drop] = holding
                _hold(object_pos, held_by, holding, a, pos[a], box_w[a], box_h[a], object_size, carrying)
                t, holding, leave = t_drop, -1, True
            elif choice == "stand":
                t_end = min(t + int(rng.integers(2 * fps, 5 * fps)), T)
                pos[a, t:t_end] = here
                t = t_end
            elif choice == "walk":
                t, here = _walk(pos[a], moving[a], t, here, rng.uniform([0, 0], limit), speed, T)
            elif choice == "approach":
                o = int(rng.integers(n_objects))
                if held_by[o, t] >= 0:
                    continue
                ox, oy = object_pos[o, t]
                left = ox + object_size[o] / 2 < here[0] + box_w[a] / 2
                # stop beside it, the object at hand height, one pixel of air between
                x = ox - box_w[a] - 1 if left else ox + object_size[o] + 1
                target = np.clip([x, oy + object_size[o] / 2 - box_h[a] / 2], 0, limit)
                t0 = t
                t, here = _walk(pos[a], moving[a], t, here, target, speed, T)
                approaching[a, t0:t] = o
                t_touch = min(t + int(rng.integers(fps, 3 * fps)), T)
                pos[a, t:t_touch] = here
                t = t_touch
                if t < T and rng.uniform() < 0.6 and (held_by[o, t:] < 0).all():
                    holding, t_pick = o, t
                else:
                    leave = True
            elif a > 0:  # walk up beside an actor placed before this one
                b = int(rng.integers(a))
                other = pos[b, min(t + 2 * fps, T - 1)]
                side = -1 if other[0] < here[0] else 1
                target = np.clip(other + [side * (box_w[b] + 2), 0], 0, limit)
                t, here = _walk(pos[a], moving[a], t, here, target, speed, T)
                t_end = min(t + int(rng.integers(2 * fps, 4 * fps)), T)
                pos[a, t:t_end] = here
                t, leave = t_end, True
        if holding >= 0:  # the video ends while it carries
            carrying[a, t_pick:] = holding
            _hold(object_pos, held_by, holding, a, pos[a], box_w[a], box_h[a], object_size, carrying)
        # waving: a few intervals of 2-4 s
        for _ in range(int(rng.integers(1, 4))):
            t0 = int(rng.integers(0, T))
            waving[a, t0:t0 + int(rng.integers(2 * fps, 4 * fps))] = True
    xy = np.round(pos).astype(np.int64)
    actor_boxes = np.concatenate([xy, xy + np.stack([box_w, box_h], 1)[:, None, :]], axis=2)
    background = _background(W, H, rng)
    colours = ACTOR_COLOURS[rng.permutation(len(ACTOR_COLOURS))][np.arange(n_actors) % len(ACTOR_COLOURS)]
    return World(T, lead, actor_boxes, moving, waving, carrying, approaching, object_pos, object_size,
                 colours, OBJECT_COLOURS[rng.integers(len(OBJECT_COLOURS), size=n_objects)], background)


def _walk(pos, moving, t, here, target, speed, T):
    """Walk in a straight line from ``here`` to ``target`` from frame ``t``; returns (t, here) after."""
    dist = float(np.hypot(*(target - here)))
    steps = max(int(np.ceil(dist / speed)), 1)
    end = min(t + steps, T)
    frac = (np.arange(1, end - t + 1) / steps)[:, None]
    pos[t:end] = here + (target - here) * frac
    moving[t:end] = True
    return end, (pos[end - 1].copy() if end > t else here)


def _hold(object_pos, held_by, o, a, actor_pos, box_w, box_h, object_size, carrying):
    """Put object ``o`` beside actor ``a`` at hand height on the frames it carries it; afterwards it
    stays where it was put down."""
    frames = np.flatnonzero(carrying[a] == o)
    if not len(frames):
        return
    x = np.round(actor_pos[frames, 0]).astype(np.int64) + box_w + 1
    y = np.round(actor_pos[frames, 1] + box_h / 2 - object_size[o] / 2).astype(np.int64)
    object_pos[o, frames] = np.stack([x, y], 1)
    object_pos[o, frames[-1] + 1:] = object_pos[o, frames[-1]]
    held_by[o, frames] = a


def _background(W: int, H: int, rng: np.random.Generator) -> np.ndarray:
    """A calm two-colour gradient with a few blocks of slightly other shade (compresses well)."""
    a, b = rng.integers(70, 140, (2, 3))
    ramp = (np.arange(W)[None, :, None] * (b - a) / W + a).astype(np.int16)
    frame = np.broadcast_to(ramp, (H, W, 3)).copy()
    for _ in range(6):
        x, y = rng.integers(0, W - 16), rng.integers(0, H - 16)
        frame[y:y + 16, x:x + 16] += rng.integers(-15, 16, 3).astype(np.int16)
    return np.clip(frame, 0, 255).astype(np.uint8)


def _render(demo: DemoAvaSpec, w: World) -> np.ndarray:
    """(T, H, W, 3) uint8: objects, then actors (body, head, arm when waving, every other 2 frames)."""
    W, H = demo.width, demo.height
    frames = np.broadcast_to(w.background, (w.n_frames, H, W, 3)).copy()
    obj_boxes = w.object_boxes()
    for t in range(w.n_frames):
        f = frames[t]
        for o in range(len(w.object_size)):
            x1, y1, x2, y2 = np.clip(obj_boxes[o, t], 0, [W, H, W, H])
            f[y1:y2, x1:x2] = w.object_colour[o]
        if t < w.lead:
            continue
        for a in range(len(w.actor_boxes)):
            x1, y1, x2, y2 = w.actor_boxes[a, t]
            f[y1 + HEAD:y2, x1 + ARM:x2 - ARM] = w.actor_colour[a]
            hx = (x1 + x2 - HEAD) // 2
            f[y1:y1 + HEAD, hx:hx + HEAD] = (225, 190, 160)
            if w.waving[a, t]:  # both arms, up and down at a quarter of the frame rate
                ay = y1 if (t // 2) % 2 == 0 else y1 + HEAD
                f[ay:ay + 2 * HEAD, x1:x1 + ARM] = (255, 255, 255)
                f[ay:ay + 2 * HEAD, x2 - ARM:x2] = (255, 255, 255)
    return frames


# ---- annotations -----------------------------------------------------------------------------------

def _labels(w: World, t: int) -> list[list[int]]:
    """Action ids of every actor at frame ``t``."""
    ids = {name: i for i, (name, _) in ACTIONS.items()}
    boxes = w.actor_boxes[:, t]
    obj = w.object_boxes()[:, t]
    out = []
    for a in range(len(boxes)):
        labels = [ids["walk"] if w.moving[a, t] else ids["stand"]]
        if w.waving[a, t]:
            labels.append(ids["wave"])
        if w.carrying[a, t] >= 0:
            labels.append(ids["carry"])
        elif (_gap(boxes[a], obj) <= TOUCH_GAP).any():
            labels.append(ids["touch"])
        if w.approaching[a, t] >= 0 and _gap(boxes[a], obj[w.approaching[a, t]][None])[0] > TOUCH_GAP:
            labels.append(ids["approach"])
        others = np.delete(boxes, a, axis=0)
        if len(others) and (_gap(boxes[a], others) <= NEAR_GAP).any():
            labels.append(ids["near_person"])
        out.append(sorted(labels))
    return out


def _gap(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Pixels of air between ``box`` and each of ``boxes`` side by side: the horizontal gap where
    the vertical centre of the other lies within the middle half of ``box`` (hand height), else
    infinite."""
    dx = np.maximum(np.maximum(boxes[:, 0] - box[2], box[0] - boxes[:, 2]), 0)
    centre = (boxes[:, 1] + boxes[:, 3]) / 2
    quarter = (box[3] - box[1]) / 4
    beside = (centre >= box[1] + quarter) & (centre <= box[3] - quarter)
    return np.where(beside, dx, np.inf)


def _annotate(demo: DemoAvaSpec, w: World, vid: str, rng: np.random.Generator
              ) -> tuple[list[str], list[str], list[str]]:
    """GT rows, proposal rows and excluded keyframes of one video: a keyframe every second, 2 s
    clear of either end."""
    size = np.array([demo.width, demo.height, demo.width, demo.height], float)
    gt, proposals, excluded = [], [], []
    for sec in range(2, int(w.n_frames / demo.fps) - 1):
        t = sec * demo.fps
        ts = demo.timestamp_offset_s + sec
        boxes = w.actor_boxes[:, t] / size if t >= w.lead else np.zeros((0, 4))
        is_excluded = len(boxes) > 0 and rng.uniform() < demo.excluded_fraction
        if is_excluded:
            excluded.append(f"{vid},{ts:04d}")
        if len(boxes) and not is_excluded:
            for person, (box, labels) in enumerate(zip(boxes, _labels(w, t))):
                gt += [f"{vid},{ts:04d},{_fmt(box)},{label},{person}" for label in labels]
        kept = boxes[rng.uniform(size=len(boxes)) >= demo.proposal_miss]
        wh = np.repeat(kept[:, 2:] - kept[:, :2], 2, axis=0).reshape(-1, 4)[:, [0, 1, 0, 1]] \
            if len(kept) else np.zeros((0, 4))
        jittered = np.clip(kept + rng.uniform(-1, 1, kept.shape) * demo.proposal_jitter * wh, 0, 1)
        # most true boxes score above the usual thresholds (0.85 / 0.9), a few are weak
        scores = np.where(rng.uniform(size=len(kept)) < 0.9, rng.uniform(0.9, 1.0, len(kept)),
                          rng.uniform(0.5, 0.9, len(kept)))
        n_fp = int(rng.poisson(demo.false_positives + (0.5 if not len(boxes) else 0.0)))
        corner = rng.uniform(0, 0.8, (n_fp, 2))
        fp = np.concatenate([corner, corner + rng.uniform([0.05, 0.15], [0.2, 0.4], (n_fp, 2))], 1)
        for box, score in zip(np.concatenate([jittered, np.clip(fp, 0, 1)]),
                              np.concatenate([scores, rng.uniform(0.2, 0.95, n_fp)])):
            proposals.append(f"{vid},{ts:04d},{_fmt(box)},,{score:.4f}")
    return gt, proposals, excluded


def _fmt(box: np.ndarray) -> str:
    return ",".join(f"{v:.3f}" for v in box)


def _encode(frames: np.ndarray, fps: int, path: Path) -> None:
    """FFV1 (lossless) in Matroska, bit-exact muxing (no version string, no random UIDs), one thread:
    identical bytes everywhere, and decoding returns exactly the drawn frames."""
    import av

    with av.open(str(path), "w", format="matroska", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("ffv1", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "bgr0"  # RGB without chroma subsampling: no colour conversion to differ
        stream.options = {"threads": "1"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
