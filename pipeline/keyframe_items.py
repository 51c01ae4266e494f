"""Keyframe items of a detect dataset, for stages declared ``per_item: keyframes``.

Every keyframe of the dataset's splits (``pipeline.ava.load_split``: ground-truth keyframes plus
proposal keyframes, excluded ones removed) is one item: its id is the keyframe id ``"<video>,<ts>"``,
its path the video file, and its fingerprint the video file's together with the keyframe's second in
that file (so a new ``timestamp_offset_s`` redoes the keyframes it moves, and nothing else).

Reading the AVA files costs seconds on the full CSVs and imports numpy, which planning must not: the
list is kept under ``<cache>/keyframes/`` per version of the files (their fingerprints, the offset
and the splits), and a rerun with unchanged files reads one small JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.context import write_json_atomic
from pipeline.keys import digest

LIST_DIR = "keyframes"


def keyframe_list(dataset, index, cache_root: Path) -> list[tuple[str, str, float]]:
    """(keyframe id, video id, seconds in the video file) of every keyframe of the dataset's splits."""
    layout = dataset.ava
    files = layout.files()
    version = digest({"files": {k: index.fingerprint(p) for k, p in sorted(files.items())},
                      "offset": layout.timestamp_offset_s, "splits": sorted(set(layout.splits.values()))}, 24)
    path = Path(cache_root) / LIST_DIR / f"{dataset.name}-{version}.json"
    try:
        with open(path) as f:
            return [tuple(row) for row in json.load(f)]
    except (OSError, ValueError):
        pass
    from pipeline.ava import keyframe_id, load_split

    found: dict[str, tuple[str, str, float]] = {}
    for split_name in sorted(set(layout.splits.values())):
        split = load_split(dataset, split_name)
        for video, stamps in split.keyframes.items():
            for ts in stamps:
                kid = keyframe_id(video, ts)
                found[kid] = (kid, video, float(split.time_in_video(ts)))
    rows = sorted(found.values())
    write_json_atomic(path, rows)
    return rows


def keyframe_items(dataset, videos: list[tuple[str, str, str]], index, cache_root: Path
                   ) -> tuple[list[tuple[str, str, str]], list[str]]:
    """``videos``: (video id, path, fingerprint) of the files present. Returns (keyframe id, video path,
    fingerprint) of every keyframe whose video is present, and the ids of the videos that are not."""
    by_id = {vid: (path, fp) for vid, path, fp in videos}
    items, missing = [], set()
    for kid, video, seconds in keyframe_list(dataset, index, cache_root):
        if video not in by_id:
            missing.add(video)
            continue
        path, fp = by_id[video]
        items.append((kid, path, f"{fp}@{seconds:.6f}s"))
    return items, sorted(missing)
