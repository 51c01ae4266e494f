"""Fast feature reads for training: whole videos or windows, from the store or from memory; whole
records of a store with fields (keyframe maps and context tokens) through :class:`RecordReader`.

:class:`FeatureReader` is what a training loop reads features through (the localizers pass it as their
feature source and pick their own crop windows, which need the annotations). The store is opened
lazily in the process that reads, so DataLoader workers each open their own after the fork and no
HDF5 handle crosses it; a window read touches only its rows. With ``in_memory`` every video is read
once (in the stored dtype, float16 by default, to halve the memory) and forked workers share those
arrays copy-on-write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.store import open_stage_store

# `in_memory="auto"` holds the features in memory when their stored bytes fit in this budget.
AUTO_MEMORY_BYTES = 2 << 30


class _PerProcessStore:
    """The store opened lazily in the process that reads (forked / spawned workers open their own)."""

    stage_dir: Path
    _store = None
    _pid: int | None = None

    def _open(self):
        if self._store is None or self._pid != os.getpid():
            self._store = open_stage_store(self.stage_dir)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict:
        """Spawned workers get no open store (they open their own)."""
        state = dict(self.__dict__)
        state["_store"], state["_pid"] = None, None
        return state


class FeatureReader(_PerProcessStore):
    def __init__(self, stage_dir: Path | str, video_ids: Sequence[str],
                 in_memory: bool | str = "auto") -> None:
        self.stage_dir = Path(stage_dir)
        self.video_ids = list(video_ids)
        store = open_stage_store(self.stage_dir)
        try:
            missing = [v for v in self.video_ids if v not in store]
            if missing:
                raise KeyError(f"{self.stage_dir}: {len(missing)} video(s) not complete in the store, "
                               f"e.g. {missing[:3]}")
            self.shapes = {v: store.shape(v) for v in self.video_ids}
            if in_memory == "auto":
                itemsize = np.dtype(store.attrs.get("dtype", "float16")).itemsize
                in_memory = sum(t * c for t, c in self.shapes.values()) * itemsize <= AUTO_MEMORY_BYTES
            self.in_memory = bool(in_memory)
            self._cache = {v: store.read(v, raw=True) for v in self.video_ids} if self.in_memory else None
        finally:
            store.close()

    def __reduce__(self):
        """Pickled as what to read, not what was read: a training process started elsewhere (spawned,
        or a torchrun rank on another node) reads the store itself."""
        return type(self), (self.stage_dir, self.video_ids, self.in_memory)

    def read(self, vid: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """``(T, C)`` float32 rows ``[start, stop)`` of one video."""
        if self._cache is not None:
            return self._cache[vid][start:stop].astype(np.float32)
        return self._open().read(vid, start, stop)


class RecordReader(_PerProcessStore):
    """Records of a store with fields, by id (a keyframe id ``"<video>,<timestamp>"`` in a keyframe store).

    ``attrs``: the store attributes (preset, backbone, ``feature_dim``, ``feature_stride``, ``fields``
    ...); ``ids``: the complete records, sorted. ``read(rid)`` -> ``{field: array, ..., "attrs": the
    record's attributes}``, arrays float32 unless ``raw`` (then the stored float16).
    """

    def __init__(self, stage_dir: Path | str) -> None:
        self.stage_dir = Path(stage_dir)
        store = open_stage_store(self.stage_dir)
        try:
            if store.fields is None:
                raise ValueError(f"{self.stage_dir}: a store of (T, C) videos, not of records with fields")
            self.attrs = dict(store.attrs)
            self.fields = store.fields
            self.ids = store.videos()
        finally:
            store.close()

    def read(self, rid: str, raw: bool = False) -> dict:
        store = self._open()
        out: dict = dict(store.read(rid, raw=raw))
        out["attrs"] = store.video_attrs(rid)
        return out
