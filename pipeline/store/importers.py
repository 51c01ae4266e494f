"""Readers of public per-video feature layouts; each yields (video id, array) with the file it came from.

- ``npy``: a folder of ``<video_id>.npy``, (T, C) each (ActionFormer's THUMOS I3D, ActivityNet TSP);
- ``npz``: a folder of ``<video_id>.npz`` holding ``feats`` (EPIC-KITCHENS SlowFast);
- ``pkl``: a folder of ``<video_id>.pkl``, each an array or a dict with ``feats`` (TSP's per-video
  output). Read by an unpickler that knows numpy arrays only: a pickle that would run code is refused.
- ``h5``: one HDF5 file with a (T, C) dataset per video (TSP's merged file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError
from pipeline.untrusted import load_pickle

FORMATS = ("npy", "npz", "pkl", "h5")


@dataclass(frozen=True)
class Source:
    """One video's features inside the imported files; ``where`` names it in messages."""

    vid: str
    file: Path
    key: str | None = None  # dataset name inside an HDF5 file

    @property
    def where(self) -> str:
        return f"{self.file}:{self.key}" if self.key is not None else str(self.file)


def list_sources(src: Path, fmt: str) -> list[Source]:
    src = Path(src)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: unknown; one of {', '.join(FORMATS)}")
    if not src.exists():
        raise ConfigError(f"{src}: not found")
    if fmt == "h5":
        files = sorted(src.glob("*.h5")) + sorted(src.glob("*.hdf5")) if src.is_dir() else [src]
        if len(files) != 1:
            raise ConfigError(f"{src}: expected one HDF5 file with a dataset per video, found {len(files)}")
        return _h5_sources(files[0])
    if not src.is_dir():
        raise ConfigError(f"{src}: --format {fmt} expects a folder of per-video .{fmt} files")
    sources = [Source(p.stem, p) for p in sorted(src.glob(f"*.{fmt}")) if p.is_file()]
    if not sources:
        raise ConfigError(f"{src}: no .{fmt} files")
    return sources


def _h5_sources(path: Path) -> list[Source]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            names = sorted(f.keys())
            kinds = {n: isinstance(f[n], h5py.Dataset) for n in names}
    except OSError as e:
        raise ConfigError(f"{path}: not a readable HDF5 file ({e})") from None
    groups = [n for n in names if not kinds[n]]
    if groups:
        raise ConfigError(f"{path}:{groups[0]}: a group; expected one (T, C) dataset per video at the top level")
    if not names:
        raise ConfigError(f"{path}: no datasets")
    return [Source(n, path, key=n) for n in names]


def load(source: Source, fmt: str) -> np.ndarray:
    """The array of one video, checked to be a finite numeric (T, C) matrix."""
    try:
        arr = _load_raw(source, fmt)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a file we cannot parse is a user input error
        raise ConfigError(f"{source.where}: cannot read .{fmt} features ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        what = f"dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise ConfigError(f"{source.where}: features must be a numeric array, got {what}")
    if arr.ndim != 2 or 0 in arr.shape:
        raise ConfigError(f"{source.where}: features must have shape (T, C), got {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ConfigError(f"{source.where}: features contain NaN/Inf "
                          f"({int((~np.isfinite(arr)).sum())} values)")
    return arr


def _load_raw(source: Source, fmt: str):
    if fmt == "npy":
        return np.load(source.file, allow_pickle=False)
    if fmt == "npz":
        with np.load(source.file, allow_pickle=False) as z:
            if "feats" not in z.files:
                raise ConfigError(f"{source.where}: no 'feats' array (has: {', '.join(z.files) or 'none'})")
            return z["feats"]
    if fmt == "pkl":
        obj = load_pickle(source.file)
        if isinstance(obj, dict):
            if "feats" not in obj:
                raise ConfigError(f"{source.where}: a dict without 'feats' (keys: {', '.join(map(str, obj))})")
            obj = obj["feats"]
        return np.asarray(obj) if isinstance(obj, (list, tuple)) else obj
    import h5py

    with h5py.File(source.file, "r") as f:
        return f[source.key][...]
