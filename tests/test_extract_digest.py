"""``extract``'s output is pinned: the reduced demo's features, digested byte for byte, and its stage key.

The digest was computed on the code before the engine learnt keyframe extraction (samplers, outputs) and
optical flow; an engine change that moves one bit of one feature, or the key, fails here. The key was
computed again when extract gained the params ``streams``, ``flow`` and ``flow_weights`` (a new param
changes every key; the RGB-only features it pins did not change). The features come
from the tiny seeded I3D, whose float16 outputs were the same at one and two torch threads here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from pipeline.store import open_stage_store

ROOT = Path(__file__).resolve().parent.parent

MANIFEST = {
    "name": "digest_demo",
    "task": "localize",
    "generate": {"seed": 3, "train_videos": 3, "test_videos": 1, "duration_s": [5, 7], "fps": 12,
                 "size": 32, "instances": [1, 2], "action_s": [2, 3]},
    "splits": {"train": "train", "test": "test"},
    "params": {"extract": {"preset": "demo", "size": 32, "crop": [32, 32]}},
}
KEY = "29d5fd0305455df22b6bd81e"
DIGEST = "14fbc899a7299eb34fbdd6b6c9b63a70c2e0ecc336f2693dd8fe5a548e8e068a"


def features_digest(stage_dir: Path) -> str:
    h = hashlib.sha256()
    with open_stage_store(stage_dir) as store:
        for vid in store.videos():
            arr = store.read(vid, raw=True)
            h.update(f"{vid}:{arr.dtype.str}:{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def test_extract_output_and_key_unchanged(tmp_path):
    manifest = tmp_path / "digest_demo.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--cache-dir", str(tmp_path / "cache"), "--json",
                           "run", "extract", "--dataset", str(manifest), "--workers", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stage,) = json.loads(proc.stdout)["stages"]
    assert stage["items"]["done"] == 4
    assert (stage["key"], features_digest(Path(stage["dir"]))) == (KEY, DIGEST)
