"""``pipeline verify``, ``pipeline import-features`` and ``pipeline export``: ``fn(argv, cmd) -> int``.

``cmd`` is the core's CommandContext (``cache_dir``, ``json``, ``load_dataset``, ``stage_dir``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipeline.cli_args import CommandParser
from pipeline.errors import ConfigError


def _emit(cmd, args, obj: dict, lines: list[str]) -> None:
    if cmd.json or args.json:
        print(json.dumps(obj, sort_keys=True))
    else:
        for line in lines:
            print(line)


# ------------------------------------------------------------------------------------------ verify
def verify(argv: list[str], cmd) -> int:
    """Check every feature store in the cache (extract's, extract_keyframes' ...; or the ones named)
    against its completion records, and
    list the temporary files killed writes left in the cache.

    Exit 0 when everything is consistent (or was repaired), 1 when problems remain."""
    p = CommandParser(json_help="one JSON object on stdout",
                      prog="pipeline verify", description=verify.__doc__)
    p.add_argument("--repair", action="store_true",
                   help="remove incomplete/unreadable videos and records without data (they are redone next run)")
    p.add_argument("--stage-dir", type=Path, action="append", default=[], help="verify only this stage dir")
    args = p.parse_args(argv)
    from pipeline.store import BACKENDS

    root = Path(cmd.cache_dir)
    dirs = args.stage_dir or sorted(d for d in root.glob("*/*")
                                    if d.is_dir() and any((d / n).exists() for n in BACKENDS.values()))
    report, lines = [], []
    for d in dirs:
        entry = verify_stage_dir(Path(d), Path(cmd.cache_dir), args.repair)
        report.append(entry)
        state = entry["skipped"] or ("ok" if not entry["problems"] else
                                     ("repaired" if args.repair else f"{len(entry['problems'])} problem(s)"))
        lines.append(f"{d}: {entry['videos']} videos, {state}")
        lines.extend(f"  {line}" for line in entry["problems"])
    if not dirs:
        lines.append(f"{root}: no feature stores")
    from pipeline.cache import leftovers, remove_leftovers

    left = [str(p) for p in (remove_leftovers if args.repair else leftovers)(Path(cmd.cache_dir))]
    lines += [f"{p}: left by a killed write" + (" (removed)" if args.repair else
                                                  " (removed by --repair, gc or the next run)") for p in left]
    bad = any(e["problems"] and (not args.repair or e.get("unreadable")) for e in report) or \
        bool(left and not args.repair)
    _emit(cmd, args, {"stores": report, "leftovers": left, "repaired": args.repair, "ok": not bad}, lines)
    return 1 if bad else 0


def verify_stage_dir(stage_dir: Path, cache_dir: Path, repair: bool) -> dict:
    """Problems of one extract dir: the store's own (incomplete/unreadable videos) and mismatches
    between it and ``items/<vid>.json`` (a record without data, data without a record, other shape).
    Skips a dir whose extraction is running (its in-flight videos are incomplete by design)."""
    from pipeline.locking import is_locked
    from pipeline.store import open_stage_store

    entry = {"dir": str(stage_dir), "videos": 0, "problems": [], "skipped": None, "unreadable": False}
    if is_locked(cache_dir, stage_dir.parent.name, stage_dir.name):
        entry["skipped"] = "skipped: an extraction of this key is running"
        return entry
    records_dir = stage_dir / "items"
    try:
        store = open_stage_store(stage_dir, mode="a" if repair else "r")
    except (OSError, ValueError) as e:  # kept, not repaired: removing a whole store is the user's call
        entry["problems"].append(f"{stage_dir}: store unreadable ({e})")
        entry["unreadable"] = True
        return entry
    with store:
        entry["problems"] = store.verify(repair=repair)
        videos = set(store.videos())
        records = {p.stem: p for p in records_dir.glob("*.json")} if records_dir.is_dir() else {}
        for vid in sorted(set(records) | videos):
            why = _record_mismatch(store, vid, records.get(vid), vid in videos)
            if why is None:
                continue
            entry["problems"].append(f"{stage_dir}: {vid}: {why}")
            if repair:
                if vid in records:
                    records[vid].unlink()
                if vid in videos:
                    store.delete(vid)
        entry["videos"] = len(store.videos())
    return entry


def _record_mismatch(store, vid: str, record_path: Path | None, has_data: bool) -> str | None:
    if record_path is None:
        return "data without a completion record (redone next run)"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable record {record_path.name} ({e})"
    if not has_data:
        return "completion record without complete data"
    shape, stored = record.get("shape"), store.shape(vid)
    if isinstance(stored, dict):        # a record of fields: shapes per field
        shape, stored = record.get("shapes"), {name: list(s) for name, s in stored.items()}
    elif shape is not None:
        shape = tuple(shape)
    if shape is not None and shape != stored:
        return f"record shape {shape} != stored shape {stored}"
    fp = record.get("source_fingerprint")
    stored = store.video_attrs(vid).get("source_fingerprint")
    if fp and stored and fp != stored:
        return "record and store disagree on the source fingerprint"
    return None


# ---------------------------------------------------------------------------------- import-features
def import_features(argv: list[str], cmd) -> int:
    """Import public per-video features as the dataset's extract output."""
    from pipeline.store.importers import FORMATS
    from pipeline.store.imports import import_into_cache, unregister

    p = CommandParser(json_help="one JSON object on stdout",
                      prog="pipeline import-features", description=import_features.__doc__)
    p.add_argument("source", type=Path, nargs="?", help="folder of per-video files, or the .h5 file")
    p.add_argument("--dataset", required=True, help="dataset manifest name or path")
    p.add_argument("--format", choices=FORMATS, help="npy | npz (feats) | pkl | h5 (a dataset per video)")
    p.add_argument("--preset", help="thumos_i3d | anet_tsp | epic_slowfast (time mapping of a public set)")
    p.add_argument("--fps", type=float, help="sampled fps of the features (default: preset, else per video "
                                             "from the annotation file)")
    p.add_argument("--stride", type=int)
    p.add_argument("--clip-len", type=int)
    p.add_argument("--frame-interval", type=int)
    p.add_argument("--offset-frames", type=float, help="frames from a clip's start to its time stamp "
                                                       "(default clip_len*frame_interval/2)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--backend", choices=("zarr", "hdf5"), default="zarr")
    p.add_argument("--unregister", action="store_true",
                   help="forget the dataset's imported features (extract runs normally again)")
    args = p.parse_args(argv)
    dataset = cmd.load_dataset(args.dataset)
    if args.unregister:
        removed = unregister(cmd.cache_dir, dataset)
        _emit(cmd, args, {"dataset": dataset.name, "unregistered": removed},
              [f"{dataset.name}: " + ("import registration removed" if removed else "nothing was imported")])
        return 0
    if args.source is None or args.format is None:
        raise ConfigError("pipeline import-features: give the SOURCE folder/file and --format")
    mapping = mapping_from_args(args)
    from pipeline.cache import Cache
    from pipeline.fingerprints import FingerprintIndex

    index = FingerprintIndex(Cache(cmd.cache_dir).index_path)
    log = (lambda msg: None) if cmd.json or args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    reg = import_into_cache(args.source, args.format, dataset, Path(cmd.cache_dir), mapping, dtype=args.dtype,
                            backend=args.backend, fingerprints=index.fingerprints, log=log)
    _emit(cmd, args, reg, [f"{dataset.name}: extract = {reg['videos']} videos imported from {reg['source']} "
                     f"as {reg['dtype']} (key {reg['key']}, {reg['dir']})"])
    return 0


def mapping_from_args(args):
    from pipeline.store.imports import TimeMapping
    from pipeline.store.presets import get_preset

    given = {"fps": args.fps, "stride": args.stride, "clip_len": args.clip_len,
             "frame_interval": args.frame_interval, "offset_frames": args.offset_frames}
    given = {k: v for k, v in given.items() if v is not None}
    if args.preset:
        pr = get_preset(args.preset)
        base = {"fps": pr.fps, "stride": pr.stride, "clip_len": pr.clip_len, "frame_interval": pr.frame_interval,
                "tail": pr.tail, "preset": pr.name, "backbone": pr.backbone, "feature_dim": pr.feature_dim}
        return TimeMapping(**{**base, **given})
    missing = [f"--{k.replace('_', '-')}" for k in ("stride", "clip_len") if k not in given]
    if missing:
        raise ConfigError(f"pipeline import-features: give --preset or {' and '.join(missing)} "
                          "(and --fps unless the annotation file has each video's fps)")
    return TimeMapping(**{"fps": None, **given})


# ------------------------------------------------------------------------------------------- export
def export_features(argv: list[str], cmd) -> int:
    """Write a dataset's features (or any extract dir's) as one <video_id>.npy per video."""
    from pipeline.context import write_json_atomic
    from pipeline.store import open_stage_store
    from pipeline.store.imports import lookup

    p = CommandParser(json_help="one JSON object on stdout",
                      prog="pipeline export", description=export_features.__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="the dataset whose current extract output (or import) to export")
    src.add_argument("--stage-dir", type=Path, help="an extract output directory")
    p.add_argument("--to", type=Path, required=True, help="output folder")
    p.add_argument("--set", dest="sets", action="append", default=[], help="stage.param=value (with --dataset)")
    p.add_argument("--dtype", choices=("float32", "float16", "stored"), default="float32")
    args = p.parse_args(argv)
    if args.stage_dir is not None:
        stage_dir = args.stage_dir
    else:
        dataset = cmd.load_dataset(args.dataset)
        reg = lookup(cmd.cache_dir, dataset)
        stage_dir = Path(reg["dir"]) if reg else cmd.stage_dir("extract", dataset, args.sets)
        if stage_dir is None:
            raise ConfigError(f"--dataset {dataset.name}: extract is not done for the current key "
                              f"(run `pipeline run extract --dataset {dataset.name}` or give --stage-dir)")
    args.to.mkdir(parents=True, exist_ok=True)
    with open_stage_store(stage_dir) as store:
        videos = store.videos()
        for vid in videos:
            arr = store.read(vid, raw=args.dtype != "float32")
            if args.dtype == "float16":
                arr = arr.astype("float16", copy=False)
            _save_npy_atomic(args.to / f"{vid}.npy", arr)
        write_json_atomic(args.to / "export_info.json",
                          {"source": str(stage_dir), "videos": len(videos), "attrs": store.attrs})
    _emit(cmd, args, {"dir": str(args.to), "videos": len(videos), "source": str(stage_dir)},
          [f"exported {len(videos)} videos from {stage_dir} to {args.to}"])
    return 0


def _save_npy_atomic(path: Path, arr) -> None:
    import numpy as np

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)
