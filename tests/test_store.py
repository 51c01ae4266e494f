"""Feature store round trips, slices, attributes, completion marks, verify, and the time mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.store import create_store, open_stage_store, open_store
from pipeline.timemap import TimeGrid

BACKENDS = ["zarr", "hdf5"]
ATTRS = {"backbone": "i3d", "fps_policy": "native", "clip_len": 16, "stride": 4, "frame_interval": 1,
         "offset_frames": None, "feature_dim": 32}


def _feats(seed: int, t: int, c: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(t, c)).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, backend, dtype):
    store = create_store(tmp_path, backend=backend, dtype=dtype, attrs=ATTRS)
    arrays = {f"vid{i}": _feats(i, 20 + 7 * i) for i in range(4)}
    for vid, arr in arrays.items():
        store.write(vid, arr, {"sampled_fps": 30.0, "n_frames": 123, "source_fingerprint": "abc"})
    store.close()
    store = open_stage_store(tmp_path)
    assert store.videos() == sorted(arrays)
    extra = {"compression": "none"} if backend == "zarr" else {}
    assert store.attrs == {**ATTRS, "dtype": dtype, "backend": backend, **extra}
    for vid, arr in arrays.items():
        expected = arr.astype(dtype)
        got = store.read(vid)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected.astype(np.float32))
        assert store.read(vid, raw=True).dtype == np.dtype(dtype)
        assert store.shape(vid) == arr.shape
        assert store.video_attrs(vid) == {"sampled_fps": 30.0, "n_frames": 123, "source_fingerprint": "abc",
                                          "complete": True}
    assert "vid1" in store and "nope" not in store
    with pytest.raises(KeyError):
        store.read("nope")
    store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_slice_reads(tmp_path, backend):
    store = create_store(tmp_path, backend=backend, attrs=ATTRS)
    arr = _feats(0, 100).astype(np.float16)
    store.write("v", arr, {})
    for start, stop in [(0, 10), (37, 64), (90, None), (None, 5), (-10, None), (50, 50), (95, 500)]:
        np.testing.assert_array_equal(store.read("v", start, stop, raw=True), arr[start:stop])
    store.close()


def test_zarr_slice_reads_only_the_rows_asked_for(tmp_path, monkeypatch):
    import pipeline.store.zarr_store as zs

    monkeypatch.setattr(zs, "CHUNK_BYTES", 10 * 32 * 2)  # 10 rows per chunk
    store = create_store(tmp_path, attrs=ATTRS)
    arr = _feats(1, 95).astype(np.float16)
    store.write("v", arr, {})
    chunks = sorted((tmp_path / "features.zarr" / "v" / "c").iterdir(), key=lambda p: int(p.name))
    assert len(chunks) == 10
    opened = []
    real_open = open

    def spy(path, *args, **kwargs):
        if Path(path).parent.parent.name == "c":
            opened.append(Path(path).parent.name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    np.testing.assert_array_equal(store.read("v", 25, 41, raw=True), arr[25:41])
    assert opened == ["2", "3", "4"]
    np.testing.assert_array_equal(store.read("v", raw=True), arr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_written_video_is_invisible_and_rewritten(tmp_path, backend):
    store = create_store(tmp_path, backend=backend, attrs=ATTRS)
    store.write("done", _feats(0, 10), {})
    store._write_data("half", _feats(1, 12).astype(np.float16), {})  # crash before the completion mark
    assert store.videos() == ["done"] and "half" not in store
    with pytest.raises(KeyError):
        store.read("half")
    problems = store.verify()
    assert len(problems) == 1 and "half" in problems[0] and "incomplete" in problems[0]
    assert store.verify(repair=True) == problems
    assert store.verify() == []
    store.write("half", _feats(2, 8), {})
    assert store.videos() == ["done", "half"]
    np.testing.assert_array_equal(store.read("half"), _feats(2, 8).astype(np.float16).astype(np.float32))
    store.delete("done")
    assert store.videos() == ["half"]
    store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_rejects_bad_arrays(tmp_path, backend):
    store = create_store(tmp_path, backend=backend, attrs=ATTRS)
    bad = _feats(0, 5)
    bad[2, 3] = np.nan
    for arr, msg in [(bad, "NaN"), (np.full((3, 32), 1e6), "float16 range"), (np.zeros((3, 7)), "feature dimension"),
                     (np.zeros(5), "shape"), (np.array([["a"] * 32]), "numeric")]:
        with pytest.raises(ValueError, match=msg):
            store.write("v", arr, {})
    with pytest.raises(ValueError, match="invalid video id"):
        store.write("../x", _feats(0, 3), {})
    with pytest.raises(ValueError, match="invalid video id"):
        store.delete("../x")
    assert "../x" not in store and "" not in store
    assert store.videos() == []
    store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reopen_needs_same_attrs_and_readonly_refuses_writes(tmp_path, backend):
    create_store(tmp_path, backend=backend, attrs=ATTRS).close()
    create_store(tmp_path, backend=backend, attrs=ATTRS).close()
    with pytest.raises(ValueError, match="stride"):
        create_store(tmp_path, backend=backend, attrs={**ATTRS, "stride": 8})
    store = open_stage_store(tmp_path)
    with pytest.raises(PermissionError):
        store.write("v", _feats(0, 3), {})
    store.close()


def test_open_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="no feature store"):
        open_stage_store(tmp_path)
    with pytest.raises(ConfigError, match="not a feature store"):
        open_store(tmp_path / "x.npy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_uses_video_fps_else_store_fps(tmp_path, backend):
    store = create_store(tmp_path, backend=backend, attrs={**ATTRS, "fps": 15.0})
    store.write("own", _feats(0, 4), {"sampled_fps": 30.0})
    store.write("fixed", _feats(0, 4), {})
    assert store.grid("own") == TimeGrid(30.0, 4, 16)
    assert store.grid("fixed") == TimeGrid(15.0, 4, 16)
    store.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_memory", [False, True, "auto"])
def test_reader_windows_and_workers_open_their_own_store(tmp_path, backend, in_memory):
    import torch
    from torch.utils.data import DataLoader, Dataset

    from pipeline.store.loader import FeatureReader

    store = create_store(tmp_path, backend=backend, attrs=ATTRS)
    arrays = {f"v{i}": _feats(i, n).astype(np.float16) for i, n in enumerate([10, 50, 8])}
    for vid, arr in arrays.items():
        store.write(vid, arr, {})
    store.close()
    reader = FeatureReader(tmp_path, ["v0", "v1", "v2"], in_memory=in_memory)
    assert reader._store is None and reader.shapes["v1"] == (50, 32)
    assert reader.in_memory == (in_memory in (True, "auto"))  # a few KB fit the auto budget
    window = reader.read("v1", 20, 36)
    assert window.dtype == np.float32 and window.shape == (16, 32)
    np.testing.assert_array_equal(window, arrays["v1"][20:36].astype(np.float32))
    np.testing.assert_array_equal(reader.read("v0"), arrays["v0"].astype(np.float32))

    fresh = FeatureReader(tmp_path, ["v0", "v1", "v2"], in_memory=in_memory)

    class Windows(Dataset):  # what a training loop's workers do: read through one shared reader
        def __len__(self):
            return 3

        def __getitem__(self, i):
            vid = f"v{i}"
            return vid, torch.from_numpy(fresh.read(vid, 0, 8))

    loader = DataLoader(Windows(), batch_size=None, num_workers=2, multiprocessing_context="fork")
    got = {vid: feats for vid, feats in loader}
    for vid, arr in arrays.items():
        np.testing.assert_array_equal(got[vid].numpy(), arr[:8].astype(np.float32))
    assert fresh._store is None  # only the workers opened it

    with pytest.raises(KeyError, match="not complete"):
        FeatureReader(tmp_path, ["v0", "missing"])


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_compressed_zarr_reads_through_zarr(tmp_path, compression):
    store = create_store(tmp_path, attrs=ATTRS, compression=compression)
    arr = _feats(3, 60).astype(np.float16)
    store.write("v", arr, {"sampled_fps": 25.0})
    meta = (tmp_path / "features.zarr" / "v" / "zarr.json").read_text()
    assert ("zstd" if compression == "zstd" else "blosc") in meta
    reader = open_stage_store(tmp_path)
    assert reader.attrs["compression"] == compression
    np.testing.assert_array_equal(reader.read("v", raw=True), arr)
    np.testing.assert_array_equal(reader.read("v", 13, 29, raw=True), arr[13:29])
    assert reader.verify() == []
    with pytest.raises(ConfigError, match="compression"):
        create_store(tmp_path / "h", backend="hdf5", attrs=ATTRS, compression=compression)
