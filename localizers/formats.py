"""Detections in the formats other tools read, besides the ActivityNet submission JSON.

- ActionFormer's results pickle (what its ``eval.py --saveonly`` writes and its evaluator reads):
  ``{"video-id": [...], "t-start": array, "t-end": array, "label": int array, "score": array}``, one
  entry per detection, labels as indices into the class list;
- the THUMOS14 detection text format of the official evaluator (``TH14evalDet``): one line per
  detection, ``video start end class_id score``, with the official class ids (``detclasslist.txt``)
  when the classes are THUMOS14's, else 1-based positions in the class list.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.context import write_bytes_atomic, write_text_atomic

# The 20 THUMOS14 detection classes and their UCF101 ids (THUMOS14 detclasslist.txt).
THUMOS14_CLASS_IDS = {
    "BaseballPitch": 7, "BasketballDunk": 9, "Billiards": 12, "CleanAndJerk": 21, "CliffDiving": 22,
    "CricketBowling": 23, "CricketShot": 24, "Diving": 26, "FrisbeeCatch": 31, "GolfSwing": 33,
    "HammerThrow": 36, "HighJump": 40, "JavelinThrow": 45, "LongJump": 51, "PoleVault": 68, "Shotput": 79,
    "SoccerPenalty": 85, "TennisSwing": 92, "ThrowDiscus": 93, "VolleyballSpiking": 97,
}


def _rows(results: Mapping[str, Sequence[Mapping]]):
    for vid, dets in results.items():
        for d in dets:
            yield vid, float(d["segment"][0]), float(d["segment"][1]), d["label"], float(d["score"])


def write_results_pickle(path: Path, results: Mapping[str, Sequence[Mapping]], classes: Sequence[str]) -> None:
    index = {c: i for i, c in enumerate(classes)}
    rows = list(_rows(results))
    out = {"video-id": [r[0] for r in rows],
           "t-start": np.asarray([r[1] for r in rows], dtype=np.float32),
           "t-end": np.asarray([r[2] for r in rows], dtype=np.float32),
           "label": np.asarray([index.get(r[3], -1) for r in rows], dtype=np.int64),
           "score": np.asarray([r[4] for r in rows], dtype=np.float32)}
    write_bytes_atomic(Path(path), pickle.dumps(out))


def write_thumos_txt(path: Path, results: Mapping[str, Sequence[Mapping]], classes: Sequence[str]) -> None:
    official = set(classes) <= set(THUMOS14_CLASS_IDS)
    ids = {c: THUMOS14_CLASS_IDS[c] if official else i + 1 for i, c in enumerate(classes)}
    lines = [f"{vid} {start:.2f} {end:.2f} {ids[label]} {score:.4f}\n"
             for vid, start, end, label, score in _rows(results) if label in ids]
    write_text_atomic(Path(path), "".join(lines))
