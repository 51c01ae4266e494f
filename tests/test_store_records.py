"""Stores with fields: N-D named arrays per record, indexed by keyframe id ("video,timestamp"), on both
back-ends, read whole through the store and through RecordReader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.store import create_store, open_stage_store
from pipeline.store.loader import FeatureReader, RecordReader

FIELDS = {"map": ["C", "H", "W"], "context": ["C", "T"]}
ATTRS = {"index": "keyframe", "fields": FIELDS, "feature_dim": 6, "feature_stride": 16}


def record(seed: int, h: int = 3, w: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    return {"map": rng.normal(size=(6, h, w)).astype(np.float32),
            "context": rng.normal(size=(6, 5)).astype(np.float32)}


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_keyframe_records_round_trip_with_commas_in_ids(tmp_path, backend):
    data = {"-5KQ66BBWC4,0902": record(0), "-5KQ66BBWC4,0903": record(1, 2, 5), "vid_b,1798": record(2)}
    with create_store(tmp_path, backend, "float16", ATTRS) as store:
        for rid, arrays in data.items():
            store.write(rid, arrays, {"frame_height": 48, "frame_width": 64})
    with open_stage_store(tmp_path) as store:
        assert store.fields == {"map": ("C", "H", "W"), "context": ("C", "T")}
        assert store.videos() == sorted(data)
        assert store.shape("-5KQ66BBWC4,0903") == {"map": (6, 2, 5), "context": (6, 5)}
        raw = store.read("vid_b,1798", raw=True)
        assert {k: v.dtype for k, v in raw.items()} == {"map": np.float16, "context": np.float16}
        assert store.verify() == []
    reader = RecordReader(tmp_path)
    assert reader.ids == sorted(data) and reader.attrs["feature_stride"] == 16
    for rid, arrays in data.items():
        got = pickle.loads(pickle.dumps(reader)).read(rid)
        assert got["attrs"]["frame_width"] == 64 and got["attrs"]["complete"] is True
        for name, arr in arrays.items():
            assert got[name].dtype == np.float32
            np.testing.assert_array_equal(got[name], arr.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_records_are_checked_against_the_declared_fields(tmp_path, backend):
    with create_store(tmp_path, backend, "float16", ATTRS) as store:
        with pytest.raises(ValueError, match="fields"):
            store.write("v,0001", {"map": record(0)["map"]})
        with pytest.raises(ValueError, match=r"shape \(C, T\)"):
            store.write("v,0001", {**record(0), "context": np.zeros((6, 2, 2))})
        with pytest.raises(ValueError, match="feature dimension 5"):
            store.write("v,0001", {**record(0), "map": np.zeros((5, 3, 3))})
        assert store.videos() == []


def test_an_unmarked_record_is_invisible_and_verify_finds_it(tmp_path):
    with create_store(tmp_path, "zarr", "float16", ATTRS) as store:
        store.write("v,0001", record(0))
        store._mark_complete = lambda rid: None        # a writer that dies before its completion mark
        store.write("v,0002", record(1))
    with open_stage_store(tmp_path) as store:
        assert store.videos() == ["v,0001"] and "v,0002" not in store
        assert [line.split(": ")[-1] for line in store.verify()] == ["incomplete (no completion mark)"]


def test_plain_readers_refuse_the_other_kind(tmp_path):
    with create_store(tmp_path, "zarr", "float16", ATTRS) as store:
        store.write("v,0001", record(0))
    with pytest.raises(ValueError, match="row range"):
        open_stage_store(tmp_path).read("v,0001", 0, 1)
    plain = tmp_path / "plain"
    with create_store(plain, "zarr", "float16", {"feature_dim": 6}) as store:
        store.write("v", np.zeros((3, 6)))
    with pytest.raises(ValueError, match="not of records with fields"):
        RecordReader(plain)
    assert FeatureReader(plain, ["v"]).read("v").shape == (3, 6)
