"""Several processes write different videos into one zarr store at once; HDF5 refuses a second writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import create_store, open_stage_store

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ATTRS = {"stride": 4, "clip_len": 16, "fps": 30.0, "feature_dim": 256}

WRITER = """
import sys
import numpy as np
from pipeline.store import create_store
worker, n = int(sys.argv[2]), int(sys.argv[3])
store = create_store(sys.argv[1], attrs={attrs!r})
for i in range(worker * n, (worker + 1) * n):
    rng = np.random.default_rng(i)
    store.write(f"v{{i:02d}}", rng.standard_normal((int(rng.integers(50, 400)), 256)), {{"n_frames": i}})
""".format(attrs=ATTRS)


def _expected(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.standard_normal((int(rng.integers(50, 400)), 256)).astype(np.float16)


def test_four_processes_write_forty_videos_into_one_zarr_store(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w), "10"], cwd=ROOT, env=ENV,
                              stderr=subprocess.PIPE, text=True) for w in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    store = open_stage_store(tmp_path)
    assert store.videos() == [f"v{i:02d}" for i in range(40)]
    assert store.attrs["feature_dim"] == 256
    for i in range(40):
        np.testing.assert_array_equal(store.read(f"v{i:02d}", raw=True), _expected(i))
        assert store.video_attrs(f"v{i:02d}") == {"n_frames": i, "complete": True}
    assert store.verify() == []


def test_hdf5_refuses_a_second_writer(tmp_path):
    store = create_store(tmp_path, backend="hdf5", attrs=ATTRS)
    store.write("v00", _expected(0), {})
    probe = ("import sys\nfrom pipeline.store import create_store\n"
             f"create_store(sys.argv[1], backend='hdf5', attrs={ATTRS!r})")
    res = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and "single writer per file" in res.stderr
    store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_hdf5_reader_reopens_after_fork(tmp_path):
    store = create_store(tmp_path, backend="hdf5", attrs=ATTRS)
    store.write("v00", _expected(0), {})
    store.close()
    reader = open_stage_store(tmp_path)
    np.testing.assert_array_equal(reader.read("v00", raw=True), _expected(0))
    parent_file = reader._file
    pid = os.fork()
    if pid == 0:  # child: must not touch the parent's handle
        ok = reader.read("v00", 5, 9, raw=True).tolist() == _expected(0)[5:9].tolist()
        os._exit(0 if ok and reader._file is not parent_file else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reader._file is parent_file
    np.testing.assert_array_equal(reader.read("v00", raw=True), _expected(0))
    reader.close()
