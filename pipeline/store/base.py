"""The FeatureStore interface shared by the zarr and HDF5 back-ends, and the checks both apply.

A store holds one record per index entry plus store-level attributes (how the features were made) and
per-record attributes. Two record kinds, declared once by the store attributes:

- plain (no ``fields`` attribute): one (T, C) array per video, the extract store;
- with ``fields`` (name -> axis names, e.g. ``{"map": ["C", "H", "W"], "context": ["C", "T"]}``): one
  named array per field per record, of any rank; ``index`` names what a record id is (``keyframe``:
  ``"<video>,<timestamp>"``). Every field has a ``C`` axis checked against ``feature_dim``.

A record counts only once its completion mark is written, after its data: a record half-written by a
crashed process is invisible to :meth:`FeatureStore.videos` and reads, and the next ``write`` of it
replaces it.
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


PLAIN_AXES = ("T", "C")


def prepare_array(vid: str, array: Any, dtype: str, feature_dim: int | None,
                  axes: tuple[str, ...] = PLAIN_AXES) -> np.ndarray:
    """Validate one array of a record (shape ``axes``, its ``C`` axis ``feature_dim`` long) and cast it
    to the store dtype (checked after the cast, so float16 overflow is caught too)."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{vid}: features must be numeric, got dtype {arr.dtype}")
    if arr.ndim != len(axes) or 0 in arr.shape:
        raise ValueError(f"{vid}: features must have shape ({', '.join(axes)}) with {', '.join(axes)} > 0, "
                         f"got {arr.shape}")
    channels = arr.shape[axes.index("C")]
    if feature_dim is not None and channels != int(feature_dim):
        raise ValueError(f"{vid}: feature dimension {channels} != store feature_dim {feature_dim}")
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

    @property
    def fields(self) -> dict[str, tuple[str, ...]] | None:
        """Field name -> axis names of a store with named N-D arrays per record; None: plain (T, C)."""
        fields = self.attrs.get("fields")
        return None if fields is None else {name: tuple(axes) for name, axes in fields.items()}

    def write(self, vid: str, array: Any, attrs: Mapping[str, Any] | None = None) -> None:
        """Store one record: data first, then its attributes with ``complete: true`` last. ``array``:
        the (T, C) features of a plain store, or a mapping field name -> array of a store with fields."""
        self._check_writable()
        check_video_id(vid)
        fields = self.fields
        dtype, feature_dim = self.attrs["dtype"], self.attrs.get("feature_dim")
        if fields is None:
            data = prepare_array(vid, array, dtype, feature_dim)
        else:
            if not isinstance(array, Mapping) or set(array) != set(fields):
                got = sorted(array) if isinstance(array, Mapping) else type(array).__name__
                raise ValueError(f"{vid}: a record of this store has fields {sorted(fields)}, got {got}")
            data = {name: prepare_array(f"{vid}: {name}", array[name], dtype, feature_dim, axes)
                    for name, axes in fields.items()}
        video_attrs = normalize_attrs(attrs or {})
        video_attrs.pop(COMPLETE, None)
        self._write_data(vid, data, video_attrs)
        self._mark_complete(vid)

    def read(self, vid: str, start: int | None = None, stop: int | None = None,
             raw: bool = False) -> np.ndarray | dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of a complete video (only those rows are read from disk); in a store
        with fields, the whole record as field name -> array (no row range). float32 unless ``raw``
        (then the stored dtype)."""
        self._require(vid)
        if self.fields is not None:
            if start is not None or stop is not None:
                raise ValueError(f"{self.path}: records with fields are read whole (no row range)")
            return {name: arr if raw else arr.astype(np.float32, copy=False)
                    for name, arr in self._read_fields(vid).items()}
        arr = self._read(vid, start, stop)
        return arr if raw else arr.astype(np.float32, copy=False)

    def shape(self, vid: str) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
        """(T, C) of a video; field name -> shape of a record with fields."""
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
    def _read_fields(self, vid: str) -> dict[str, np.ndarray]:
        ...

    @abstractmethod
    def _shape(self, vid: str) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
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
    fields = out.get("fields")
    if fields is not None and (not isinstance(fields, dict) or not fields or not all(
            isinstance(axes, list) and axes.count("C") == 1 and all(isinstance(a, str) for a in axes)
            for axes in fields.values())):
        raise ValueError(f"store fields must map names to axis-name lists with one 'C' axis, got {fields!r}")
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
