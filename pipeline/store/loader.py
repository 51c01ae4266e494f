"""Training loader over a feature store: ``(video_id, feats float32 tensor (C, T))`` per item.

The store is opened lazily in the process that reads (so DataLoader workers each open their own after
the fork, and no HDF5 handle crosses it). Long videos are cropped to at most ``max_seq_len`` steps
and only the cropped rows are read. ``in_memory=True`` reads every video once at construction and
closes the store again; forked workers then share those arrays copy-on-write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.store import open_stage_store

Crop = Callable[[int, int], tuple[int, int]]


def random_crop(length: int, max_len: int) -> tuple[int, int]:
    """A uniformly placed window of ``max_len`` steps, drawn from torch's RNG (seeded per worker)."""
    start = int(torch.randint(0, length - max_len + 1, ()).item())
    return start, start + max_len


class FeatureSequenceDataset(Dataset):
    """``crop(length, max_seq_len) -> (start, stop)`` picks the window of a video longer than
    ``max_seq_len`` (default: :func:`random_crop`); shorter videos come whole."""

    def __init__(self, stage_dir: Path | str, video_ids: Sequence[str], max_seq_len: int | None = None,
                 crop: Crop | None = None, in_memory: bool = False) -> None:
        self.stage_dir = Path(stage_dir)
        self.video_ids = list(video_ids)
        self.max_seq_len = max_seq_len
        self.crop = crop or random_crop
        self._store = None
        self._pid: int | None = None
        store = open_stage_store(self.stage_dir)
        try:
            missing = [v for v in self.video_ids if v not in store]
            if missing:
                raise KeyError(f"{self.stage_dir}: {len(missing)} video(s) not complete in the store, "
                               f"e.g. {missing[:3]}")
            self.lengths = [store.shape(v)[0] for v in self.video_ids]
            self.feature_dim = store.attrs.get("feature_dim") or store.shape(self.video_ids[0])[1]
            self._cache = {v: store.read(v, raw=True) for v in self.video_ids} if in_memory else None
        finally:
            store.close()

    def __len__(self) -> int:
        return len(self.video_ids)

    def _open(self):
        if self._store is None or self._pid != os.getpid():
            self._store = open_stage_store(self.stage_dir)
            self._pid = os.getpid()
        return self._store

    def window(self, index: int) -> tuple[int, int]:
        length = self.lengths[index]
        if self.max_seq_len is None or length <= self.max_seq_len:
            return 0, length
        return self.crop(length, self.max_seq_len)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        vid = self.video_ids[index]
        start, stop = self.window(index)
        if self._cache is not None:
            rows = self._cache[vid][start:stop]
        else:
            rows = self._open().read(vid, start, stop, raw=True)
        return vid, torch.from_numpy(np.ascontiguousarray(rows.T, dtype=np.float32))

    def __getstate__(self) -> dict:
        """Spawned workers get no open store (they open their own)."""
        state = dict(self.__dict__)
        state["_store"], state["_pid"] = None, None
        return state
