"""Feature stores: one (T, C) array per video with store- and video-level attributes.

``create_store`` / ``open_stage_store`` / ``open_store`` pick the back-end (zarr v3 by default, HDF5 on
request); both behave the same through :class:`~pipeline.store.base.FeatureStore`. Importing this
package is cheap (planning imports ``pipeline.store.imports``): numpy, zarr and h5py load only when a
store is created or opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import ConfigError

BACKENDS = {"zarr": "features.zarr", "hdf5": "features.h5"}

__all__ = ["FeatureStore", "create_store", "open_stage_store", "open_store", "BACKENDS"]


def __getattr__(name: str):
    if name == "FeatureStore":
        from pipeline.store.base import FeatureStore

        return FeatureStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _backend_class(backend: str):
    if backend == "zarr":
        from pipeline.store.zarr_store import ZarrStore

        return ZarrStore
    if backend == "hdf5":
        from pipeline.store.hdf5_store import HDF5Store

        return HDF5Store
    raise ConfigError(f"store backend must be one of {sorted(BACKENDS)}, got {backend!r}")


def create_store(stage_dir: Path, backend: str = "zarr", dtype: str = "float16",
                 attrs: Mapping[str, Any] | None = None, compression: str = "none") -> FeatureStore:
    """Open the store of ``stage_dir`` for writing, creating it with ``attrs`` if it is new.

    Reopening an existing store requires the same attributes (features made differently never mix).
    ``compression`` (zarr only: none | zstd | lz4) is a store attribute; uncompressed reads fastest.
    """
    from pipeline.store.base import store_attrs_for

    cls = _backend_class(backend)
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    wanted = store_attrs_for(attrs or {}, dtype, backend)
    if backend == "zarr":
        from pipeline.store.zarr_store import COMPRESSORS

        if compression not in COMPRESSORS:
            raise ConfigError(f"store compression must be one of {COMPRESSORS}, got {compression!r}")
        wanted["compression"] = compression
    elif compression != "none":
        raise ConfigError("store compression: only the zarr backend compresses (HDF5 is stored contiguous)")
    return cls(stage_dir / BACKENDS[backend], mode="a", attrs=wanted)


def open_store(path: Path, mode: str = "r") -> FeatureStore:
    """Open an existing store file/directory; the back-end follows the suffix (.zarr / .h5)."""
    path = Path(path)
    by_suffix = {".zarr": "zarr", ".h5": "hdf5", ".hdf5": "hdf5"}
    if path.suffix not in by_suffix:
        raise ConfigError(f"{path}: not a feature store (expected a .zarr directory or a .h5 file)")
    if not path.exists():
        raise ConfigError(f"{path}: feature store does not exist")
    return _backend_class(by_suffix[path.suffix])(path, mode=mode)


def find_store_path(stage_dir: Path) -> Path:
    stage_dir = Path(stage_dir)
    found = [stage_dir / name for name in BACKENDS.values() if (stage_dir / name).exists()]
    if len(found) != 1:
        what = "no feature store" if not found else "two feature stores"
        raise ConfigError(f"{stage_dir}: {what} (expected one of {', '.join(BACKENDS.values())})")
    return found[0]


def open_stage_store(stage_dir: Path, mode: str = "r") -> FeatureStore:
    """Open the store inside an extract output directory (``features.zarr`` or ``features.h5``)."""
    return open_store(find_store_path(stage_dir), mode=mode)
