"""A small synthetic localization dataset for the localizer tests: features with class-specific
patterns inside the annotated segments, a feature store, annotations and stage contexts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from localizers.data import make_item
from pipeline.context import StageContext
from pipeline.datasets import Dataset
from pipeline.store import create_store
from pipeline.timemap import TimeGrid

FPS, STRIDE, CLIP = 8.0, 4, 8           # 2 features per second; feature i centred at (4i + 4) / 8 s
DIM, CLASSES = 16, ("jump", "run", "throw")
GRID = TimeGrid(fps=FPS, stride=STRIDE, clip_len=CLIP)
INDEX = {c: i for i, c in enumerate(CLASSES)}


def items_of(videos: dict, points: bool = False) -> list:
    """The training items of :func:`make_videos` output (``points``: its actions as point events)."""
    return [make_item(vid, f.shape, GRID, (STRIDE * len(f) + CLIP) / FPS, np.array([a[:2] for a in acts]),
                      [a[2] for a in acts], INDEX, DIM, 8, points=points)
            for vid, (f, acts) in videos.items()]


def make_videos(n: int, seed: int, length=(96, 160)) -> dict:
    """``{vid: (features (T, DIM) float32, [(start_s, end_s, label)])}``: noise, plus in each action a
    fixed direction of its class, so a localizer can learn the classes and the boundaries."""
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(99).normal(size=(len(CLASSES), DIM)).astype(np.float32)
    videos = {}
    for v in range(n):
        t = int(rng.integers(*length))
        feats = rng.normal(scale=0.5, size=(t, DIM)).astype(np.float32)
        actions, pos = [], int(rng.integers(2, 10))
        while True:
            dur = int(rng.integers(6, 30))
            if pos + dur >= t - 2:
                break
            c = int(rng.integers(len(CLASSES)))
            feats[pos: pos + dur] += 2.0 * protos[c]
            actions.append(((STRIDE * pos + CLIP / 2) / FPS, (STRIDE * (pos + dur) + CLIP / 2) / FPS, CLASSES[c]))
            pos += dur + int(rng.integers(4, 20))
        videos[f"vid_{seed}_{v:03d}"] = (feats, actions)
    return videos


def write_dataset(root: Path, train: dict, test: dict, points: bool = False) -> tuple[Dataset, Path]:
    """Store + annotation file + Dataset; returns the dataset and the extract dir. ``points``: annotate
    each action's onset as a point event (``timestamp``) instead of its segment."""
    extract_dir = root / "cache" / "extract" / "k1"
    store = create_store(extract_dir, dtype="float32",
                         attrs={"fps": FPS, "stride": STRIDE, "clip_len": CLIP, "frame_interval": 1,
                                "feature_dim": DIM})
    db = {}
    for subset, videos in (("Validation", train), ("Test", test)):
        for vid, (feats, actions) in videos.items():
            store.write(vid, feats, {"sampled_fps": FPS})
            duration = (STRIDE * len(feats) + CLIP) / FPS
            db[vid] = {"subset": subset, "duration": duration, "fps": FPS,
                       "annotations": [{"timestamp": a, "label": c} if points else {"segment": [a, b], "label": c}
                                       for a, b, c in actions]}
    store.close()
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"database": db}))
    ds = Dataset(name="synthetic", task="localize", path=root / "synthetic.yaml", root=root, videos=None,
                 annotations=ann, splits={"train": "validation", "test": "test"}, params={})
    return ds, extract_dir


def stage_context(root: Path, name: str, key: str, params: dict, dataset: Dataset, upstream: dict) -> StageContext:
    out = root / "cache" / name / f"{key}.partial"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(name=name, key=key, params=params, runtime={"device": "cpu"}, dataset=dataset,
                        out_dir=out, upstream=upstream)


def finish(ctx: StageContext) -> Path:
    """What the runner does on success: rename ``<key>.partial`` to ``<key>``."""
    final = ctx.out_dir.with_name(ctx.key)
    ctx.out_dir.rename(final)
    return final
