"""Imported feature sets as first-class extract outputs, and their registration per dataset.

``import_into_cache`` turns public feature files into ``<cache>/extract/<key>/`` exactly like an
extraction would leave it (a store, ``items/<vid>.json`` records, ``manifest.json`` with
``imported_from``) and registers it in ``<cache>/imports/<name>-<hash of the manifest's path>.json``,
which records the manifest's path and content digest: an import belongs to one manifest file (found
again by its content when the file moves), never to every manifest that shares its ``name:``. The key hashes the
imported files' content fingerprints and the time-mapping parameters. The store is built in
``<key>.partial`` beside its final place, under the key's lock, and renamed in when every file has
passed the checks, so a bad file leaves nothing behind. The core runner consults :func:`lookup` when planning ``extract``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.context import write_json_atomic
from pipeline.errors import ConfigError

IMPORT_FORMAT = 1


@dataclass(frozen=True)
class TimeMapping:
    """How imported features sit in time; ``fps`` None means each video's fps from the annotations."""

    fps: float | None
    stride: int
    clip_len: int
    frame_interval: int = 1
    offset_frames: float | None = None
    tail: str = "drop"
    preset: str | None = None
    backbone: str = "imported"
    feature_dim: int | None = None  # expected dimension (presets), checked against every file

    def __post_init__(self) -> None:
        for name in ("stride", "clip_len", "frame_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)!r}")
        if self.fps is not None and not self.fps > 0:
            raise ConfigError(f"--fps: expected a positive number, got {self.fps!r}")


def manifest_identity(dataset) -> tuple[str, str]:
    """(resolved path, sha256 of the content) of a dataset's manifest: what an import belongs to. Two
    manifests that share a ``name:`` are two datasets."""
    path = Path(dataset.path).resolve()
    try:
        content = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        content = ""
    return str(path), content


def registration_path(cache_dir: Path, dataset) -> Path:
    path, _ = manifest_identity(dataset)
    return Path(cache_dir) / "imports" / f"{dataset.name}-{hashlib.sha256(path.encode()).hexdigest()[:16]}.json"


def registrations(cache_dir: Path) -> list[tuple[Path, dict]]:
    """Every registration file and its content (unreadable ones left out)."""
    out = []
    for p in sorted((Path(cache_dir) / "imports").glob("*.json")):
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _find(cache_dir: Path, dataset) -> Path | None:
    """The registration of this manifest: by its path, else by its content when the manifest it was
    made for is gone (moved, not copied)."""
    own = registration_path(cache_dir, dataset)
    if own.exists():
        return own
    _, content = manifest_identity(dataset)
    moved = [p for p, reg in registrations(cache_dir) if content and reg.get("manifest_sha256") == content
             and not Path(reg.get("manifest", "")).exists()]
    return moved[0] if moved else None


def lookup(cache_dir: Path, dataset) -> dict | None:
    """The registration of the features imported for ``dataset`` (``{"key", "dir", "source",
    "format", ...}``), or None when nothing was imported for its manifest."""
    path = _find(cache_dir, dataset)
    if path is None:
        return None
    try:
        with open(path) as f:
            reg = json.load(f)
    except (FileNotFoundError, NotADirectoryError):  # nothing imported (or no cache directory yet)
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable import registration ({e}); delete it or import again") from None
    if not (Path(reg.get("dir", "")) / "manifest.json").is_file():
        raise ConfigError(f"{path}: imported features of {dataset.name} are gone ({reg.get('dir')}); import "
                          f"again or remove the registration (pipeline import-features --unregister --dataset "
                          f"{dataset.path})")
    return reg


def unregister(cache_dir: Path, dataset) -> bool:
    path = _find(cache_dir, dataset)
    if path is not None and path.exists():
        path.unlink()
        return True
    return False


def annotation_index(path: Path | None) -> dict[str, dict]:
    """Video id -> {"fps", "duration"} from the dataset's temporal annotations (empty if it has none)."""
    if path is None:
        return {}
    from pipeline.annotations import load_temporal

    return {vid: {"fps": v.fps, "duration": v.duration} for vid, v in load_temporal(path).videos.items()}


def match_video(vid: str, known: dict[str, Any]) -> str | None:
    """The annotation id of a feature file's stem; ActivityNet feature files carry a ``v_`` prefix
    that the official annotation ids lack."""
    if vid in known:
        return vid
    if vid.startswith("v_") and vid[2:] in known:
        return vid[2:]
    return None


def import_into_cache(src: Path, fmt: str, dataset, cache_dir: Path, mapping: TimeMapping, *,
                      dtype: str = "float16", backend: str = "zarr",
                      fingerprints: Callable[[list[Path]], dict[str, str]],
                      log: Callable[[str], None] = lambda msg: None) -> dict:
    """Validate every file, build the store, rename it into the cache and register it. Returns the
    registration."""
    from pipeline.keys import stage_key
    from pipeline.store import importers

    src = Path(src).resolve()
    sources = importers.list_sources(src, fmt)
    annotations = annotation_index(dataset.annotations)
    ids: dict[str, importers.Source] = {}
    matched = [match_video(s.vid, annotations) if annotations else s.vid for s in sources]
    unmatched = [s for s, vid in zip(sources, matched) if vid is None]
    if unmatched:
        raise ConfigError(_unmatched_message(unmatched, len(sources), annotations, dataset))
    for s, vid in zip(sources, matched):
        if vid in ids:
            raise ConfigError(f"{s.where}: video {vid!r} also comes from {ids[vid].where}")
        ids[vid] = s
    fps_of = {vid: _video_fps(vid, ids[vid], mapping, annotations, dataset) for vid in ids}
    file_fps = fingerprints(sorted({s.file for s in sources}))
    source_fp = {vid: _source_fingerprint(s, file_fps) for vid, s in ids.items()}
    key = stage_key({"format": IMPORT_FORMAT, "stage": "extract", "import": fmt, "dataset": dataset.name,
                     "mapping": asdict(mapping), "fps": fps_of, "sources": source_fp, "dtype": dtype,
                     "backend": backend})
    final = Path(cache_dir) / "extract" / key
    manifest_path, manifest_sha = manifest_identity(dataset)
    reg = {"key": key, "dir": str(final), "source": str(src), "format": fmt, "preset": mapping.preset,
           "videos": len(ids), "dataset": dataset.name, "manifest": manifest_path, "manifest_sha256": manifest_sha,
           "dtype": dtype, "time": time.time()}
    from pipeline.locking import stage_lock

    # The extract key's lock: a concurrent import of the same files waits, and gc leaves the
    # partial directory alone.
    with stage_lock(Path(cache_dir), "extract", key):
        if (final / "manifest.json").is_file():
            log(f"import-features: {src} already imported as extract/{key}")
        else:
            _build(final, src, fmt, ids, fps_of, source_fp, annotations, mapping, dtype, backend, key,
                   dataset.name, log)
    write_json_atomic(registration_path(cache_dir, dataset), reg)
    return reg


def _unmatched_message(unmatched: list, total: int, annotations: dict, dataset, shown: int = 3) -> str:
    """Every file whose video is not annotated, counted, the first few named; a hint when the ids
    would match with a ``v_`` prefix added (annotation ids that carry it, files that do not)."""
    names = ", ".join(s.where for s in unmatched[:shown]) + (", ..." if len(unmatched) > shown else "")
    msg = (f"{unmatched[0].where}: {len(unmatched)} of {total} feature files name no video of the annotations "
           f"of {dataset.name} ({dataset.annotations}): {names}")
    prefixed = sum(1 for s in unmatched if f"v_{s.vid}" in annotations)
    if prefixed:
        msg += (f"; {prefixed} of them match with a 'v_' prefix (the annotation ids carry it, the files do not): "
                f"rename the files to v_<id> or strip the prefix from the annotation ids")
    return msg


def _video_fps(vid: str, source, mapping: TimeMapping, annotations: dict, dataset) -> float:
    if mapping.fps is not None:
        return float(mapping.fps)
    fps = annotations.get(vid, {}).get("fps")
    if not fps:
        where = f"the annotations ({dataset.annotations})" if dataset.annotations else "no annotation file"
        raise ConfigError(f"{source.where}: no fps for video {vid!r} in {where}; give --fps")
    return float(fps)


def _source_fingerprint(source, file_fps: dict[str, str]) -> str:
    fp = file_fps[os.path.abspath(source.file)]
    return fp if source.key is None else f"{fp}:{source.key}"


def _build(final: Path, src: Path, fmt: str, ids: dict, fps_of: dict, source_fp: dict, annotations: dict,
           mapping: TimeMapping, dtype: str, backend: str, key: str, dataset_name: str,
           log: Callable[[str], None]) -> None:
    import numpy as np

    from pipeline.cache import Cache
    from pipeline.store import create_store, importers

    t0 = time.time()
    cache = Cache(final.parent.parent)
    tmp = cache.partial_dir("extract", key)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (first_vid, first_src), *_ = ids.items()
        first = importers.load(first_src, fmt)
        dim = first.shape[1]
        if mapping.feature_dim is not None and dim != mapping.feature_dim:
            raise ConfigError(f"{first_src.where}: feature dimension {dim}, but preset {mapping.preset} "
                              f"has {mapping.feature_dim}")
        store = create_store(tmp, backend=backend, dtype=dtype, attrs=_store_attrs(mapping, dim, src, fmt))
        records = {}
        rounding = 0.0
        with store:
            for vid, source in ids.items():
                arr = first if vid == first_vid else importers.load(source, fmt)
                if arr.shape[1] != dim:
                    raise ConfigError(f"{source.where}: feature dimension {arr.shape[1]} differs from "
                                      f"{dim} of {first_src.where}")
                try:
                    store.write(vid, arr, _video_attrs(vid, source, source_fp, fps_of, annotations))
                except ValueError as e:  # e.g. values beyond the float16 range
                    raise ConfigError(f"{source.where}: {e}") from None
                if dtype == "float16":  # what storing costs, said at import
                    rounding = max(rounding, float(np.max(np.abs(arr - arr.astype(np.float16)), initial=0.0)))
                records[vid] = {"id": vid, "source_fingerprint": source_fp[vid], "shape": list(arr.shape),
                                "dtype": dtype, "sampled_fps": fps_of[vid], "imported_from": source.where}
                write_json_atomic(tmp / "items" / f"{vid}.json", records[vid])
        cache.write_records_snapshot(tmp, records)
        finished = time.time()
        manifest = {"stage": "extract", "key": key, "dataset": dataset_name, "imported_from": str(src), "format": fmt,
                    "params": asdict(mapping), "runtime": {}, "inputs": {"files": len(ids)},
                    "result": {"videos": len(ids), "feature_dim": dim, "dtype": dtype, "backend": backend,
                               "summary": f"imported {len(ids)} videos ({dim}-d) from {src}"},
                    "timings": {"started": t0, "finished": finished, "seconds": round(finished - t0, 3)},
                    "finished": finished, "items": {"total": len(ids), "done": len(ids), "skipped": 0, "failed": 0}}
        cache.commit_whole("extract", key, manifest)  # replaces a leftover without manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    change = (f" (values changed by up to {rounding:.2g}; --dtype float32 keeps them exact)"
              if dtype == "float16" else "")
    log(f"import-features: {len(ids)} videos from {src} -> {final}, stored as {dtype}{change}")


def _store_attrs(mapping: TimeMapping, dim: int, src: Path, fmt: str) -> dict:
    return {"backbone": mapping.backbone, "checkpoint_sha256": None,
            "fps_policy": "native" if mapping.fps is None else "fixed", "fps": mapping.fps,
            "clip_len": mapping.clip_len, "stride": mapping.stride, "frame_interval": mapping.frame_interval,
            "offset_frames": mapping.offset_frames, "tail": mapping.tail, "preset": mapping.preset,
            "feature_dim": dim, "imported_from": str(src), "import_format": fmt}


def _video_attrs(vid: str, source, source_fp: dict, fps_of: dict, annotations: dict) -> dict:
    ann = annotations.get(vid, {})
    return {"source_fingerprint": source_fp[vid], "source_file": source.where, "native_fps": ann.get("fps"),
            "sampled_fps": fps_of[vid], "n_frames": None, "duration": ann.get("duration")}
