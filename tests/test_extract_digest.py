"""``extract``'s output is pinned: the demo preset's features on a few small videos, digested byte for
byte, and its stage key.

The digest and the key were computed on the code before the engine learnt keyframe extraction (samplers,
outputs); an engine change that moves one bit of one feature, or the key, fails here. Two things are held
fixed so that the digest is reproducible at all:
- the videos come from ``make_video`` (identical bytes on every run), not from the demo generator, whose
  output for a reduced configuration differed between two runs here;
- clips run one per forward (``batch_size`` is a runtime setting, outside the key): with decode
  processes, which clips share a batch depends on when frames arrive, and a convolution's last float bits
  on the batch size (a clip alone differs from the same clip in a batch of 8 in float32).
The tiny seeded I3D's float16 outputs were the same at one and two torch threads here. The key was
computed again when extract gained the params ``streams``, ``flow`` and ``flow_weights`` (a new param
changes every key; the RGB-only features pinned here did not change), and again when ``flow`` became a
schema section whose fields (``estimator``, ``arch``, ``iters``, ``bound``, ``quantize``) are params of
their own (the features did not change either).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from test_decoding import make_video

from pipeline.store import open_stage_store

ROOT = Path(__file__).resolve().parent.parent
VIDEOS = {"a": dict(n_frames=70), "b": dict(n_frames=41, width=58, height=34), "c": dict(n_frames=55, blue=30),
          "d": dict(n_frames=30, durations_ms=[100, 40, 60])}
KEY = "e520af7c61597e932f0191ba"
DIGEST = "b106f4d4ebfd1f92e993c779e16bef888f7435e90eb78c110c05ccf9a5e86ed7"


def features_digest(stage_dir: Path) -> str:
    h = hashlib.sha256()
    with open_stage_store(stage_dir) as store:
        for vid in store.videos():
            arr = store.read(vid, raw=True)
            h.update(f"{vid}:{arr.dtype.str}:{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def test_extract_output_and_key_unchanged(tmp_path):
    (tmp_path / "videos").mkdir()
    for name, kwargs in VIDEOS.items():
        make_video(tmp_path / "videos" / f"{name}.mp4", **kwargs)
    manifest = tmp_path / "digest_demo.yaml"
    manifest.write_text(f"name: digest_demo\ntask: localize\nvideos: {tmp_path / 'videos'}\n"
                        "params:\n  extract: {preset: demo, size: 32, crop: [32, 32]}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--cache-dir", str(tmp_path / "cache"), "--json",
                           "run", "extract", "--dataset", str(manifest), "--workers", "1",
                           "--set", "extract.batch_size=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stage,) = json.loads(proc.stdout)["stages"]
    assert stage["items"]["done"] == len(VIDEOS)
    assert (stage["key"], features_digest(Path(stage["dir"]))) == (KEY, DIGEST)
