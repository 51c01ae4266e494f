"""HDF5 back-end: one file, one contiguous (T, C) dataset per video (or, in a store with ``fields``,
one group per record holding a contiguous dataset per field), same attributes as zarr. Record ids
such as ``video,0902`` are link names as they are (HDF5 reserves only '/' and '.').

Rules (HDF5 cannot do otherwise):
- **One writer per file.** HDF5 locks the file: a second process opening it for writing is refused.
  Parallel extraction therefore funnels every write through one process (the stage's main process
  receives features from its workers and writes them); use the zarr back-end when several processes
  or machines must write one store.
- **Flushed after each video**, so a killed writer loses only the video in flight (an unflushed HDF5
  file can become unopenable as a whole).
- **No handle crosses a fork.** Each store remembers the pid that opened it; a forked child reopens
  the file read-only on first use and leaves the inherited handle alone (closing it in the child
  would release the parent's file lock).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.store.base import COMPLETE, FeatureStore, check_same_attrs, check_slice

# Inherited handles of forked children, kept referenced so garbage collection never closes them.
_ABANDONED: list[Any] = []


_JSON = "json:"


def _plain(value: Any) -> Any:
    """h5py attribute values as plain Python (JSON-like) values."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and value.startswith(_JSON):
        return json.loads(value[len(_JSON):])
    return value


def _storable(value: Any) -> Any:
    """HDF5 attributes hold scalars, strings and flat numeric lists; anything else (None, dicts,
    mixed lists) is kept as tagged JSON text so it reads back as it was written."""
    if isinstance(value, (bool, int, float, str)) and not (isinstance(value, str) and value.startswith(_JSON)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return np.asarray(value)
    return _JSON + json.dumps(value)


class HDF5Store(FeatureStore):
    def __init__(self, path: Path, mode: str = "r", attrs: Mapping[str, Any] | None = None) -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        if mode == "r" and not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such HDF5 feature store")
        self._file = None
        self._pid = None
        f = self._h5()
        if attrs is not None and "dtype" not in f.attrs:
            for k, v in attrs.items():
                f.attrs[k] = _storable(v)
            f.flush()
        self.attrs = {k: _plain(v) for k, v in f.attrs.items()}
        if attrs is not None:
            check_same_attrs(self.path, self.attrs, attrs)

    def _h5(self):
        """The file handle of this process (opened lazily, reopened after a fork)."""
        if self._file is not None and self._pid == os.getpid():
            return self._file
        import h5py

        if self._file is not None:
            if self.mode != "r":
                raise RuntimeError(f"{self.path}: HDF5 store open for writing in process {self._pid} "
                                   "cannot be used in a forked child; write from one process")
            _ABANDONED.append(self._file)
        try:
            self._file = h5py.File(self.path, "r" if self.mode == "r" else "a")
        except BlockingIOError as e:
            raise RuntimeError(f"{self.path}: another process has this HDF5 store open for writing "
                               f"(single writer per file; use the zarr back-end for parallel writers): {e}") from None
        self._pid = os.getpid()
        return self._file

    def _node(self, vid: str):
        node = self._h5().get(vid)
        import h5py

        return node if isinstance(node, h5py.Group if self.fields is not None else h5py.Dataset) else None

    def _is_complete(self, vid: str) -> bool:
        try:
            node = self._node(vid)
            return node is not None and bool(node.attrs.get(COMPLETE, False))
        except (KeyError, OSError):
            return False

    def videos(self) -> list[str]:
        f = self._h5()
        return sorted(v for v in f.keys() if self._has(v))

    def _shape(self, vid: str) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
        node = self._node(vid)
        if self.fields is not None:
            return {name: tuple(int(n) for n in node[name].shape) for name in self.fields}
        t, c = node.shape
        return int(t), int(c)

    def _video_attrs(self, vid: str) -> dict:
        return {k: _plain(v) for k, v in self._node(vid).attrs.items()}

    def _write_data(self, vid: str, arr: np.ndarray, video_attrs: dict) -> None:
        f = self._h5()
        if vid in f:
            del f[vid]
        if self.fields is not None:
            ds = f.create_group(vid)
            for name, field in arr.items():
                ds.create_dataset(name, data=field)
        else:
            ds = f.create_dataset(vid, data=arr)  # contiguous: a slice read is one seek + read
        for k, v in video_attrs.items():
            ds.attrs[k] = _storable(v)
        f.flush()

    def _mark_complete(self, vid: str) -> None:
        f = self._h5()
        f[vid].attrs[COMPLETE] = True
        f.flush()

    def _delete(self, vid: str) -> None:
        f = self._h5()
        if vid in f:
            del f[vid]
            f.flush()

    def _read(self, vid: str, start: int | None, stop: int | None) -> np.ndarray:
        node = self._node(vid)
        start, stop = check_slice(node.shape[0], start, stop)
        out = np.empty((stop - start, node.shape[1]), dtype=node.dtype)
        if stop > start:
            node.read_direct(out, np.s_[start:stop])
        return out

    def _read_fields(self, vid: str) -> dict[str, np.ndarray]:
        node = self._node(vid)
        return {name: node[name][...] for name in self.fields}

    def verify(self, repair: bool = False) -> list[str]:
        import h5py

        f = self._h5()
        problems: list[tuple[str, str]] = []
        for name in sorted(f.keys()):
            try:
                node = f[name]
                if self.fields is not None:
                    if not isinstance(node, h5py.Group) or set(node.keys()) != set(self.fields):
                        problems.append((name, f"not a record of fields {sorted(self.fields)}"))
                    elif not node.attrs.get(COMPLETE, False):
                        problems.append((name, "incomplete (no completion mark)"))
                    else:
                        self._read_fields(name)
                elif not isinstance(node, h5py.Dataset) or node.ndim != 2:
                    problems.append((name, "not a (T, C) dataset"))
                elif not node.attrs.get(COMPLETE, False):
                    problems.append((name, "incomplete (no completion mark)"))
                else:
                    node[...]
            except Exception as e:  # noqa: BLE001 - any failure to read means the record is unusable
                problems.append((name, f"unreadable ({type(e).__name__}: {e})"))
        if repair:
            self._check_writable()
            for name, _ in problems:
                del f[name]
            f.flush()
        return [f"{self.path}: {name}: {why}" for name, why in problems]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
