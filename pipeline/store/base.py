"""The FeatureStore interface shared by the zarr and HDF5 back-ends, and the checks both apply.

A store holds one (T, C) array per video plus store-level attributes (how the features were made)
and per-video attributes. A video counts only once its completion mark is written, after its data:
a record half-written by a crashed process is invisible to :meth:`FeatureStore.videos` and reads,
and the next ``write`` of that video replaces it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.timemap import TimeGrid

DTYPES = ("float16", "float32")
COMPLETE = "complete"


def normalize_attrs(attrs: Mapping[str, Any]) -> dict:
    """Attributes as they read back from JSON (tuples become lists, numpy scalars plain numbers)."""
    try:
        return json.loads(json.dumps(dict(attrs), default=_json_default))
    except (TypeError, ValueError) as e:
        raise ValueError(f"store attributes must be JSON-able: {e}") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def check_video_id(vid: str) -> str:
    """Video ids become array names: keep them to names every back-end stores verbatim."""
    if not isinstance(vid, str) or not vid or "/" in vid or "\\" in vid or vid.startswith((".", "__")):
        raise ValueError(f"invalid video id {vid!r}: must be a non-empty file stem without '/', "
                         "not starting with '.' or '__'")
    return vid


def prepare_array(vid: str, array: Any, dtype: str, feature_dim: int | None) -> np.ndarray:
    """Validate one video's features and cast them to the store dtype (checked after the cast,
    so float16 overflow is caught too)."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{vid}: features must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{vid}: features must have shape (T, C) with T, C > 0, got {arr.shape}")
    if feature_dim is not None and arr.shape[1] != int(feature_dim):
        raise ValueError(f"{vid}: feature dimension {arr.shape[1]} != store feature_dim {feature_dim}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
        out = np.ascontiguousarray(arr, dtype=dtype)
    if not all_finite(out):
        bad = "NaN/Inf" if not np.isfinite(arr).all() else f"values beyond the {dtype} range"
        raise ValueError(f"{vid}: features contain {bad}")
    return out


_EXPONENT = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}


def all_finite(arr: np.ndarray) -> bool:
    """No NaN/Inf. Tests the exponent bits (all ones only for NaN/Inf): several times faster than
    ``np.isfinite`` on float16, which matters on the write path of every video."""
    uint, mask = _EXPONENT[arr.dtype]
    return not np.any((arr.view(uint) & mask) == mask)


def check_slice(length: int, start: int | None, stop: int | None) -> tuple[int, int]:
    """Resolve ``[start, stop)`` like a Python slice with step 1 (negative indices allowed)."""
    start, stop, _ = slice(start, stop).indices(length)
    return start, max(start, stop)


class FeatureStore(ABC):
    """Common behaviour; back-ends implement the ``_``-prefixed primitives."""

    path: Path
    mode: str
    attrs: dict

    # --- interface -------------------------------------------------------------------------
    @abstractmethod
    def videos(self) -> list[str]:
        ...

    def __contains__(self, vid: object) -> bool:
        return self._has(vid)

    def __len__(self) -> int:
        return len(self.videos())

    def write(self, vid: str, array: Any, attrs: Mapping[str, Any] | None = None) -> None:
        """Store one video: data first, then its attributes with ``complete: true`` last."""
        self._check_writable()
        check_video_id(vid)
        arr = prepare_array(vid, array, self.attrs["dtype"], self.attrs.get("feature_dim"))
        video_attrs = normalize_attrs(attrs or {})
        video_attrs.pop(COMPLETE, None)
        self._write_data(vid, arr, video_attrs)
        self._mark_complete(vid)

    def read(self, vid: str, start: int | None = None, stop: int | None = None, raw: bool = False) -> np.ndarray:
        """Rows ``[start, stop)`` of a complete video (only those rows are read from disk);
        float32 unless ``raw`` (then the stored dtype)."""
        self._require(vid)
        arr = self._read(vid, start, stop)
        return arr if raw else arr.astype(np.float32, copy=False)

    def shape(self, vid: str) -> tuple[int, int]:
        self._require(vid)
        return self._shape(vid)

    def video_attrs(self, vid: str) -> dict:
        self._require(vid)
        return self._video_attrs(vid)

    def grid(self, vid: str) -> TimeGrid:
        return TimeGrid.from_attrs(self.attrs, self.video_attrs(vid))

    def delete(self, vid: str) -> None:
        self._check_writable()
        check_video_id(vid)
        self._delete(vid)

    @abstractmethod
    def verify(self, repair: bool = False) -> list[str]:
        """Problems found, one line each (``<store>: <video>: <what>``); with ``repair`` the broken or
        incomplete records are removed so the next run rewrites them."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, mode={self.mode!r})"

    # --- helpers ---------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.mode == "r":
            raise PermissionError(f"{self.path}: store is open read-only")

    def _has(self, vid: object) -> bool:
        """A complete video ``vid``; names no writer could have made (empty, with '/', hidden) are
        not looked up."""
        return (isinstance(vid, str) and bool(vid) and "/" not in vid and not vid.startswith(".")
                and self._is_complete(vid))

    def _require(self, vid: str) -> None:
        if not self._has(vid):
            raise KeyError(f"{self.path}: no complete video {vid!r}")

    @abstractmethod
    def _is_complete(self, vid: str) -> bool:
        ...

    @abstractmethod
    def _write_data(self, vid: str, arr: np.ndarray, video_attrs: dict) -> None:
        ...

    @abstractmethod
    def _mark_complete(self, vid: str) -> None:
        ...

    @abstractmethod
    def _read(self, vid: str, start: int | None, stop: int | None) -> np.ndarray:
        ...

    @abstractmethod
    def _shape(self, vid: str) -> tuple[int, int]:
        ...

    @abstractmethod
    def _video_attrs(self, vid: str) -> dict:
        ...

    @abstractmethod
    def _delete(self, vid: str) -> None:
        ...


def store_attrs_for(attrs: Mapping[str, Any], dtype: str, backend: str) -> dict:
    """The store-level attributes written once at creation."""
    if dtype not in DTYPES:
        raise ValueError(f"store dtype must be one of {DTYPES}, got {dtype!r}")
    out = normalize_attrs(attrs)
    if out.get("dtype", dtype) != dtype:
        raise ValueError(f"attrs dtype {out['dtype']!r} disagrees with store dtype {dtype!r}")
    out["dtype"] = dtype
    out["backend"] = backend
    return out


def check_same_attrs(path: Path, existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    """Reopening a store with different attributes would mix features made differently."""
    diff = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
    if diff:
        shown = ", ".join(f"{k}: {existing.get(k)!r} != {wanted.get(k)!r}" for k in diff[:5])
        raise ValueError(f"{path}: existing store has other attributes ({shown})")
