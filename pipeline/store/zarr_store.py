"""zarr v3 back-end: one group per store, one (T, C) array per video, or one group of field arrays
per record.

Layout (plain zarr v3, readable by any zarr client)::

    features.zarr/zarr.json          group; store attributes, written once at creation
    features.zarr/<vid>/zarr.json    array metadata; per-video attributes, ``complete: true`` set last
    features.zarr/<vid>/c/<k>/0      chunk k: rows [k*R, (k+1)*R), uncompressed by default

A store with ``fields`` (keyframe maps) holds a group per record, one chunk per field array::

    features.zarr/<rid>/zarr.json            group; per-record attributes, ``complete: true`` set last
    features.zarr/<rid>/<field>/zarr.json    array metadata
    features.zarr/<rid>/<field>/c/0/0[/0]    the whole array (a record is always read whole)

Record ids such as ``video,0902`` are directory names as they are (',' is a plain character of a
zarr v3 node name).

Concurrency: every writer touches only its own video's directory and the group metadata is written
once, so several processes may write different videos into one store at once (zarr writes each
object through a temporary file and a rename). Deletions rename the video's directory aside first
so readers never see half of it.

Reads: arrays this module writes uncompressed are read straight from their chunk files (the zarr v3
layout is a spec: little-endian C-order bytes per chunk), which reads exactly the rows asked for and
avoids zarr's per-call asyncio overhead. Anything else (compressed stores, foreign layouts) goes
through zarr.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.context import write_json_atomic
from pipeline.store.base import COMPLETE, FeatureStore, check_same_attrs, check_slice

# One chunk per video up to this size (a whole-video read is one file); longer videos get equal
# chunks near this size, so the stored-whole edge chunk wastes at most a few rows.
CHUNK_BYTES = 16 * 2**20
COMPRESSORS = ("none", "zstd", "lz4")
_RAW_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}]


def chunk_rows(n_rows: int, row_bytes: int) -> int:
    n_chunks = max(1, math.ceil(n_rows * row_bytes / CHUNK_BYTES))
    return math.ceil(n_rows / n_chunks)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _zarr_codecs(compression: str):
    from zarr.codecs import BloscCodec, ZstdCodec

    return {"none": None, "zstd": ZstdCodec(level=3),
            "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")}[compression]


class ZarrStore(FeatureStore):
    def __init__(self, path: Path, mode: str = "r", attrs: Mapping[str, Any] | None = None) -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        group_meta = self.path / "zarr.json"
        if attrs is not None and mode == "a" and not group_meta.exists():
            # Concurrent creators write identical bytes through a rename: whoever wins, one group.
            write_json_atomic(group_meta, {"zarr_format": 3, "node_type": "group", "attributes": dict(attrs)})
        meta = _read_json(group_meta)
        if meta is None or meta.get("node_type") != "group":
            raise FileNotFoundError(f"{self.path}: not a zarr feature store (no group zarr.json)")
        self.attrs = meta.get("attributes", {})
        if attrs is not None:
            check_same_attrs(self.path, self.attrs, attrs)
        self._meta_cache: dict[str, dict] = {}
        self._arrays: dict[str, Any] = {}

    # --- metadata ------------------------------------------------------------------------------
    def _meta(self, vid: str) -> dict | None:
        """Array metadata of ``vid``; cached for complete videos of read-only stores."""
        cached = self._meta_cache.get(vid)
        if cached is not None:
            return cached
        try:
            meta = _read_json(self.path / vid / "zarr.json")
        except (OSError, ValueError):
            return None
        if meta is not None and self.mode == "r" and meta.get("attributes", {}).get(COMPLETE) is True:
            self._meta_cache[vid] = meta
        return meta

    def _is_complete(self, vid: str) -> bool:
        meta = self._meta(vid)
        node = "array" if self.fields is None else "group"
        return bool(meta and meta.get("node_type") == node and meta.get("attributes", {}).get(COMPLETE) is True)

    def videos(self) -> list[str]:
        with os.scandir(self.path) as it:
            names = [e.name for e in it if e.is_dir() and not e.name.startswith(".")]
        return sorted(v for v in names if self._has(v))

    def _shape(self, vid: str) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
        if self.fields is not None:
            return {name: tuple(int(n) for n in _read_json(self.path / vid / name / "zarr.json")["shape"])
                    for name in self.fields}
        t, c = self._meta(vid)["shape"]
        return int(t), int(c)

    def _video_attrs(self, vid: str) -> dict:
        return dict(self._meta(vid).get("attributes", {}))

    # --- writing -------------------------------------------------------------------------------
    def _write_data(self, vid: str, arr, video_attrs: dict) -> None:
        import zarr

        self._discard(vid)
        if self.fields is not None:
            self._write_fields(vid, arr, video_attrs)
            return
        rows = chunk_rows(arr.shape[0], arr.shape[1] * arr.itemsize)
        compression = self.attrs.get("compression", "none")
        za = zarr.create_array(
            store=str(self.path), name=vid, shape=arr.shape, chunks=(rows, arr.shape[1]), dtype=arr.dtype,
            compressors=_zarr_codecs(compression), fill_value=0, attributes=video_attrs,
            config={"write_empty_chunks": True}, zarr_format=3,
        )
        za[...] = arr
        self._fsync_chunks(vid)
        self._arrays[vid] = za

    def _write_fields(self, vid: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        import zarr

        group = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
        write_json_atomic(self.path / vid / "zarr.json", group)
        compressors = _zarr_codecs(self.attrs.get("compression", "none"))
        for name, arr in arrays.items():
            za = zarr.create_array(store=str(self.path), name=f"{vid}/{name}", shape=arr.shape, chunks=arr.shape,
                                   dtype=arr.dtype, compressors=compressors, fill_value=0,
                                   config={"write_empty_chunks": True}, zarr_format=3)
            za[...] = arr
        self._fsync_chunks(vid)
        self._arrays[vid] = group

    def _fsync_chunks(self, vid: str) -> None:
        """The completion mark may only follow data that is on disk."""
        for root, _, files in os.walk(self.path / vid):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def _mark_complete(self, vid: str) -> None:
        target = self._arrays.pop(vid)
        if isinstance(target, dict):      # a record group: its metadata is rewritten whole, by a rename
            target["attributes"] = {**target["attributes"], COMPLETE: True}
            write_json_atomic(self.path / vid / "zarr.json", target)
        else:
            target.update_attributes({COMPLETE: True})

    def _discard(self, vid: str) -> None:
        """Remove a video by renaming its directory aside first: readers see it whole or not at all."""
        src = self.path / vid
        if not src.exists():
            return
        trash = self.path / f".deleting-{vid}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(src, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _delete(self, vid: str) -> None:
        self._meta_cache.pop(vid, None)
        self._discard(vid)

    # --- reading -------------------------------------------------------------------------------
    def _raw_layout(self, meta: dict) -> int | None:
        """Chunk rows when the array is stored the way this module writes it uncompressed, else None."""
        try:
            grid = meta["chunk_grid"]
            rows, cols = grid["configuration"]["chunk_shape"]
            ok = (grid["name"] == "regular" and meta["codecs"] == _RAW_CODECS
                  and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                  and meta["data_type"] in ("float16", "float32") and cols == meta["shape"][1]
                  and not meta.get("storage_transformers"))
        except (KeyError, TypeError, ValueError):
            return None
        return int(rows) if ok else None

    def _read(self, vid: str, start: int | None, stop: int | None) -> np.ndarray:
        meta = self._meta(vid)
        t, c = meta["shape"]
        start, stop = check_slice(t, start, stop)
        rows = self._raw_layout(meta)
        if rows is not None:
            out = self._read_chunks(vid, meta["data_type"], c, rows, start, stop)
            if out is not None:
                return out
        import zarr

        return zarr.open_array(store=str(self.path / vid), mode="r")[start:stop]

    def _read_fields(self, vid: str) -> dict[str, np.ndarray]:
        return {name: self._read_whole(self.path / vid / name) for name in self.fields}

    def _read_whole(self, path: Path) -> np.ndarray:
        """One field array: straight from its single chunk file when stored raw, else through zarr."""
        meta = _read_json(path / "zarr.json")
        shape = [int(n) for n in meta["shape"]]
        grid = meta.get("chunk_grid", {})
        if (meta.get("codecs") == _RAW_CODECS and grid.get("name") == "regular"
                and grid.get("configuration", {}).get("chunk_shape") == shape
                and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}}
                and meta["data_type"] in ("float16", "float32")):
            chunk = path.joinpath("c", *["0"] * len(shape))
            arr = np.fromfile(chunk, dtype=np.dtype(meta["data_type"]).newbyteorder("<"))
            if arr.size != math.prod(shape):
                raise OSError(f"{chunk}: chunk file has {arr.size} values, expected {math.prod(shape)}")
            return arr.reshape(shape)
        import zarr

        return zarr.open_array(store=str(path), mode="r")[...]

    def _read_chunks(self, vid: str, dtype: str, c: int, rows: int, start: int, stop: int) -> np.ndarray | None:
        """Read rows straight into the output array, chunk by chunk (no intermediate copies)."""
        out = np.empty((stop - start, c), dtype=np.dtype(dtype).newbyteorder("<"))
        view = memoryview(out.reshape(-1).view(np.uint8))
        row_bytes = c * out.itemsize
        row = start
        while row < stop:
            k = row // rows
            end = min(stop, (k + 1) * rows)
            path = self.path / vid / "c" / str(k) / "0"
            try:
                f = open(path, "rb", buffering=0)
            except FileNotFoundError:
                return None  # an unwritten (fill-value) chunk: let zarr fill it
            with f:
                f.seek((row - k * rows) * row_bytes)
                want = view[(row - start) * row_bytes:(end - start) * row_bytes]
                got = f.readinto(want)
                while got < len(want):
                    more = f.readinto(want[got:])
                    if not more:
                        raise OSError(f"{path}: chunk file truncated")
                    got += more
            row = end
        return out

    # --- checking ------------------------------------------------------------------------------
    def verify(self, repair: bool = False) -> list[str]:
        problems: list[tuple[str, str]] = []
        with os.scandir(self.path) as it:
            entries = sorted((e.name, e.is_dir()) for e in it)
        for name, is_dir in entries:
            if name == "zarr.json" or not is_dir:
                continue
            if name.startswith("."):
                problems.append((name, "leftover of an interrupted delete"))
                continue
            why = self._check_video(name)
            if why:
                problems.append((name, why))
        if repair:
            self._check_writable()
            for name, _ in problems:
                self._meta_cache.pop(name, None)
                target = self.path / name
                if name.startswith("."):
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    self._discard(name)
        return [f"{self.path}: {name}: {why}" for name, why in problems]

    def _check_video(self, vid: str) -> str | None:
        try:
            meta = _read_json(self.path / vid / "zarr.json")
        except (OSError, ValueError) as e:
            return f"unreadable metadata ({e})"
        if meta is None:
            return "incomplete (no array metadata)"
        if meta.get("attributes", {}).get(COMPLETE) is not True:
            return "incomplete (no completion mark)"
        if self.fields is not None:
            try:
                for name in self.fields:
                    self._read_whole(self.path / vid / name)
            except Exception as e:  # noqa: BLE001 - any failure to decode means the record is unusable
                return f"unreadable ({type(e).__name__}: {e})"
            return None
        try:
            t, c = meta["shape"]
            rows = self._raw_layout(meta)
            if rows is None:
                import zarr

                zarr.open_array(store=str(self.path / vid), mode="r")[...]
                return None
            itemsize = np.dtype(meta["data_type"]).itemsize
            for k in range(math.ceil(t / rows)):
                chunk = self.path / vid / "c" / str(k) / "0"
                if not chunk.exists():
                    return f"unreadable (chunk {k} missing)"
                if chunk.stat().st_size != rows * c * itemsize:
                    return f"unreadable (chunk {k} has {chunk.stat().st_size} bytes, expected {rows * c * itemsize})"
        except Exception as e:  # noqa: BLE001 - any failure to decode means the record is unusable
            return f"unreadable ({type(e).__name__}: {e})"
        return None
