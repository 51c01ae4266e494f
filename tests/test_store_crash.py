"""A writer killed with SIGKILL mid-write leaves every complete record exact and the rest invisible."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import create_store, open_stage_store

ROOT = Path(__file__).resolve().parents[1]
T, C = 1500, 1024

WRITER = """
import sys
import numpy as np
from pipeline.store import create_store
store = create_store(sys.argv[1], backend=sys.argv[2], attrs={{"stride": 4, "clip_len": 16, "fps": 30.0}})
for i in range(1000):
    arr = np.random.default_rng(i).standard_normal(({T}, {C}), dtype=np.float32)
    print("start", i, flush=True)
    store.write(f"v{{i:03d}}", arr, {{"n_frames": i}})
""".format(T=T, C=C)


def _expected(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((T, C), dtype=np.float32).astype(np.float16)


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_sigkill_mid_write(tmp_path, backend):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), backend], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stdout:
        if line.split() == ["start", "3"]:
            os.kill(proc.pid, signal.SIGKILL)  # v003's data is being written right now
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    store = open_stage_store(tmp_path)
    videos = store.videos()
    assert videos[:3] == ["v000", "v001", "v002"] and set(videos) <= {"v000", "v001", "v002", "v003"}
    for vid in videos:
        np.testing.assert_array_equal(store.read(vid, raw=True), _expected(int(vid[1:])))
        assert store.video_attrs(vid)["n_frames"] == int(vid[1:])
    problems = store.verify()
    assert len(problems) <= 1 and all("v003: incomplete" in p for p in problems)
    assert not (problems and "v003" in videos)
    store.close()

    # The next run rewrites the killed video and keeps the rest.
    store = create_store(tmp_path, backend=backend, attrs={"stride": 4, "clip_len": 16, "fps": 30.0})
    store.write("v003", _expected(3), {"n_frames": 3})
    assert store.videos() == ["v000", "v001", "v002", "v003"]
    assert store.verify() == []
    np.testing.assert_array_equal(store.read("v003", raw=True), _expected(3))
    store.close()
