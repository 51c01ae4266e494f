"""Temporal action annotations: ActivityNet-style JSON or the official THUMOS14 per-class text files.

Point events (ball actions, goals: one instant each, no extent) are annotated in the same JSON with
``{"timestamp": SEC, "label": NAME}`` in place of ``"segment"``; a file holds segments or points, not
both (:attr:`TemporalAnnotations.points`), and a point is held as the segment ``[SEC, SEC]`` so the
code that maps segments onto feature grids maps points too.

Validated once, on load; every error is one line naming the file, the video and the field.
No torch here: planning and the evaluator's CLI read annotations too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.errors import ConfigError

# Official ActivityNet 1.3 durations are rounded: 215 of its segments end up to 0.85 s past `duration`.
END_TOLERANCE_S = 1.0

OutOfRange = Literal["keep", "clip", "error"]

_THUMOS_SUBSETS = {"val": "Validation", "validation": "Validation", "test": "Test"}


@dataclass(frozen=True)
class VideoAnnotation:
    id: str
    subset: str
    duration: float  # seconds; nan when the source does not say (THUMOS14 text files)
    fps: float | None
    segments: np.ndarray = field(repr=False)  # (N, 2) float64 seconds, in file order
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class TemporalAnnotations:
    path: Path
    classes: tuple[str, ...]  # sorted by label_id when every class has one, else by name
    videos: dict[str, VideoAnnotation] = field(repr=False)
    points: bool = False  # point events ("timestamp"): each segment is [t, t]

    def subset(self, name: str) -> dict[str, VideoAnnotation]:
        wanted = name.lower()
        return {vid: v for vid, v in self.videos.items() if v.subset.lower() == wanted}

    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.classes)}


def load_temporal(path: Path | str, *, out_of_range: OutOfRange = "keep") -> TemporalAnnotations:
    """Read and validate temporal annotations.

    `out_of_range` decides what happens to a segment that ends more than END_TOLERANCE_S past the
    video's duration. The official THUMOS14 ground truth has 30 such segments (5 videos whose
    annotations run past the end of the file; e.g. video_test_0000270 is annotated up to 714 s of a
    176 s video) and the official evaluator counts them as ground truth, so "keep" (the default)
    leaves them untouched and published mAPs stay reproducible. "clip" clips every segment to
    [0, duration] and drops the ones left empty (for training on features that end with the video);
    "error" rejects them. An end before the start, or a start more than END_TOLERANCE_S before 0,
    is always an error.
    """
    path = Path(path)
    if out_of_range not in ("keep", "clip", "error"):
        raise ConfigError(f"out_of_range: expected keep, clip or error, got {out_of_range!r}")
    if path.is_dir():
        return _load_thumos_txt(path)
    if not path.is_file():
        raise ConfigError(f"{path}: annotation file not found")
    return _load_json(path, out_of_range)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _load_json(path: Path, out_of_range: OutOfRange) -> TemporalAnnotations:
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
    except _DuplicateKey as e:  # json.loads would keep the last one silently: a video's labels half lost
        raise ConfigError(f"{path}: key {e.args[0]!r} appears twice in one object") from None
    database = data.get("database") if isinstance(data, dict) else None
    if not isinstance(database, dict):
        raise ConfigError(f'{path}: expected an ActivityNet-style object with a "database" mapping')

    ids: dict[str, int] = {}
    names_by_id: dict[int, str] = {}
    videos: dict[str, VideoAnnotation] = {}
    kinds: dict[str, str] = {}  # "segment" / "timestamp" -> where it was first seen
    for vid, entry in database.items():
        where = f"{path}: video {vid}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object")
        subset = entry.get("subset")
        if not isinstance(subset, str):
            raise ConfigError(f"{where}: field 'subset' missing or not a string")
        duration = _number(entry.get("duration"), f"{where}: field 'duration'")
        if duration <= 0:
            raise ConfigError(f"{where}: field 'duration' must be > 0, got {duration}")
        fps = entry.get("fps")
        if fps is not None:
            fps = _number(fps, f"{where}: field 'fps'")
            if fps <= 0:
                raise ConfigError(f"{where}: field 'fps' must be > 0, got {fps}")
        anns = entry.get("annotations")
        if not isinstance(anns, list):
            raise ConfigError(f"{where}: field 'annotations' missing or not a list")

        segments, labels = [], []
        for k, ann in enumerate(anns):
            at = f"{where}: annotations[{k}]"
            if not isinstance(ann, dict):
                raise ConfigError(f"{at}: expected an object")
            label = ann.get("label")
            if not isinstance(label, str) or not label:
                raise ConfigError(f"{at}: field 'label' missing or not a string")
            if "label_id" in ann:
                _check_label_id(ids, names_by_id, label, ann["label_id"], f"{at}: field 'label_id'")
            kind = "timestamp" if "timestamp" in ann else "segment"
            if kind == "timestamp" and "segment" in ann:
                raise ConfigError(f"{at}: has both 'segment' and 'timestamp'; a point event has only 'timestamp'")
            kinds.setdefault(kind, at)
            other = kinds.get("segment" if kind == "timestamp" else "timestamp")
            if other is not None:
                raise ConfigError(f"{at}: field '{kind}' in a file whose annotations have the other kind "
                                  f"(first at {other.split(': ', 1)[1]}): segments and point events do not mix")
            if kind == "timestamp":
                start = end = _number(ann["timestamp"], f"{at}: field 'timestamp'")
                _check_segment(start, end, f"{at}: field 'timestamp'")
            else:
                seg = ann.get("segment")
                if not isinstance(seg, (list, tuple)) or len(seg) != 2:
                    raise ConfigError(f"{at}: field 'segment' must be [start, end] in seconds "
                                      f"(or 'timestamp' for a point event)")
                start = _number(seg[0], f"{at}: field 'segment'")
                end = _number(seg[1], f"{at}: field 'segment'")
                _check_segment(start, end, f"{at}: field 'segment'")
            if end > duration + END_TOLERANCE_S:
                if out_of_range == "error":
                    raise ConfigError(
                        f"{at}: field 'segment' [{start}, {end}] ends past the video's duration {duration}"
                    )
                if out_of_range == "clip" and start >= duration:
                    continue
            if out_of_range == "clip":
                start, end = max(start, 0.0), min(end, duration)
            segments.append((start, end))
            labels.append(label)
        videos[vid] = VideoAnnotation(
            id=vid,
            subset=subset,
            duration=duration,
            fps=fps,
            segments=_as_segments(segments),
            labels=tuple(labels),
        )

    names = {label for v in videos.values() for label in v.labels}
    missing_ids = names - ids.keys()
    if ids and missing_ids:
        raise ConfigError(f"{path}: label_id given for some labels but not for {sorted(missing_ids)[:5]}")
    classes = tuple(sorted(ids, key=ids.__getitem__)) if ids else tuple(sorted(names))
    return TemporalAnnotations(path=path, classes=classes, videos=videos, points="timestamp" in kinds)


def _load_thumos_txt(folder: Path) -> TemporalAnnotations:
    """Official THUMOS14 files `<Class>_<val|test>.txt` (lines `video_id t_start t_end`), searched
    recursively. `Ambiguous` segments are not ground truth: their videos are listed, their segments
    are not. Durations and fps are unknown there (nan / None)."""
    files = sorted(p for p in folder.rglob("*.txt") if p.name != "detclasslist.txt")
    if not files:
        raise ConfigError(f"{folder}: no THUMOS14 annotation files (<Class>_val.txt, <Class>_test.txt)")
    per_video: dict[str, tuple[str, list, list]] = {}
    for f in files:
        m = re.fullmatch(r"(.+)_(val|validation|test)", f.stem)
        if m is None:
            raise ConfigError(f"{f}: expected a file named <Class>_val.txt or <Class>_test.txt")
        label, subset = m.group(1), _THUMOS_SUBSETS[m.group(2)]
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            at = f"{f}:{lineno}"
            if len(parts) != 3:
                raise ConfigError(f"{at}: expected 'video_id t_start t_end', got {line.strip()!r}")
            vid = parts[0]
            start = _number(parts[1], f"{at}: video {vid}: field 't_start'", text=True)
            end = _number(parts[2], f"{at}: video {vid}: field 't_end'", text=True)
            _check_segment(start, end, f"{at}: video {vid}: segment")
            known_subset, segments, labels = per_video.setdefault(vid, (subset, [], []))
            if known_subset != subset:
                raise ConfigError(f"{at}: video {vid} is in both {known_subset} and {subset} files")
            if label != "Ambiguous":
                segments.append((start, end))
                labels.append(label)
    videos = {
        vid: VideoAnnotation(
            id=vid,
            subset=subset,
            duration=math.nan,
            fps=None,
            segments=_as_segments(segments),
            labels=tuple(labels),
        )
        for vid, (subset, segments, labels) in sorted(per_video.items())
    }
    classes = tuple(sorted({label for v in videos.values() for label in v.labels}))
    return TemporalAnnotations(path=folder, classes=classes, videos=videos)


def _number(value, where: str, text: bool = False) -> float:
    if text:
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: not a number: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _check_segment(start: float, end: float, where: str) -> None:
    if end < start:
        raise ConfigError(f"{where}: end {end} is before start {start}")
    if start < -END_TOLERANCE_S:
        raise ConfigError(f"{where}: start {start} is before the video starts")


def _check_label_id(ids: dict[str, int], names: dict[int, str], label: str, label_id, where: str) -> None:
    if isinstance(label_id, bool) or not isinstance(label_id, int) or label_id < 0:
        raise ConfigError(f"{where}: expected an integer >= 0, got {label_id!r}")
    known = ids.setdefault(label, label_id)
    if known != label_id:
        raise ConfigError(f"{where}: {label_id} for {label!r}, which has label_id {known} elsewhere")
    other = names.setdefault(label_id, label)
    if other != label:
        raise ConfigError(f"{where}: {label_id} is used by both {other!r} and {label!r}")


def _as_segments(pairs: list) -> np.ndarray:
    return np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
