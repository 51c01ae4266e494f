"""Stage entry ``extract``: the dataset's videos -> one feature store per stage key.

Params (enter the key): ``preset`` plus any preset field as an override (``stride``, ``fps``,
``clip_len``, ``crop``, ``streams``, the ``flow`` section's ``iters`` ...; see ``extractors.presets``),
``weights`` (checkpoint file or null; ``{rgb: ..., flow: ...}`` for two I3D streams), ``flow_weights``
(the RAFT checkpoint), ``store`` (zarr | hdf5), ``dtype`` (float16 | float32).
Runtime (never in the key): ``batch_size``, ``flow_batch_size``, ``device`` (auto | cpu | cuda | cuda:N),
``video_timeout_s``, ``decoders`` (order to try, default decord then pyav).
Options: ``--workers N`` decode processes (local) or worker processes of a local cluster (ray / dask;
on a running cluster, ``--address``, N bounds the tasks in flight), ``--gpus-per-task``, ``--fail-fast``.

Processes exactly ``ctx.items``; each video's features are written to the store, then its record
(``ctx.item_done``); failures go to ``ctx.item_failed`` and the run goes on. torch is imported only
when the stage runs.

What a record is comes from ``ExtractJob.records``: :class:`VideoRecords` here (a (T, C) matrix per
video over the preset's clip grid); ``extractors.keyframes`` declares its own (a map and context
tokens per keyframe) and runs through the same :func:`run_stage` and engine.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from extractors.presets import Preset, resolve_preset
from pipeline.context import Item, StageContext
from pipeline.device import torch_device
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class VideoRecords:
    """``extract``'s records: one (T, C) matrix per video over the preset's clip grid."""

    unit = "video"

    def output(self, model):
        from extractors.outputs import ClipVectors

        return ClipVectors()

    def store_attrs(self, model) -> dict:
        return {}

    def tasks(self, items: Sequence[Item], preset: Preset) -> list:
        return list(items)

    def shard_key(self, item: Item) -> str:
        return item.id

    def write(self, store, item: Item, feats, meta, seconds: float, preset: Preset) -> dict:
        store.write(item.id, feats, {
            "source_fingerprint": item.fingerprint, "native_fps": meta.native_fps,
            "sampled_fps": meta.sampled_fps, "n_frames": meta.n_frames, "duration": meta.duration,
            "start_time": meta.start_time, "decoder": meta.decoder, "decoder_version": meta.decoder_version,
            "width": meta.width, "height": meta.height, "rotation": meta.rotation,
            "extract_seconds": round(seconds, 3)})
        # The record describes the features only: downstream keys digest it, so no timings here.
        return {"shape": list(feats.shape), "decoder": meta.decoder, "fps": meta.sampled_fps,
                "native_fps": meta.native_fps, "n_frames": meta.n_frames}


@dataclass(frozen=True)
class ExtractJob:
    """Everything a process needs to extract a list of items into the stage's store (picklable,
    so shards can run on Ray or Dask workers)."""

    params: Mapping[str, Any]
    runtime: Mapping[str, Any]
    out_dir: Path
    workers: int
    device: str
    records: Any = VideoRecords()
    stage: str = "extract"        # names the params in error messages


def extract(ctx: StageContext) -> dict:
    return run_stage(ctx, VideoRecords())


def run_stage(ctx: StageContext, records) -> dict:
    """An extraction stage: ``ctx.items`` through the engine into the stage's store, as ``records`` says."""
    started = time.perf_counter()
    preset = resolve_preset(ctx.params, ctx.name)  # params and runtime were checked against the schema when planned
    device = ctx.runtime.get("device", "auto")
    if ctx.options.backend == "local":
        device = str(torch_device(device, f"{ctx.name}.device"))
    else:  # a cluster task resolves it where it runs, with the GPUs it asked for
        device = _cluster_device(device, ctx.options.gpus_per_task, ctx.name)
    workers = max(0, int(ctx.options.workers))
    job = ExtractJob(dict(ctx.params), dict(ctx.runtime), Path(ctx.out_dir), workers, device, records, ctx.name)
    model, attrs = _model_and_attrs(preset, job)
    flow = _flow_computer(preset, job)
    attrs["flow_checkpoint_sha256"] = _flow_sha256(flow)
    # Created here, once, before any task opens it: concurrent first writers would race.
    _create_store(job, attrs).close()
    skipped = len(ctx.all_items) - len(ctx.items)
    bar = ctx.progress(total=len(ctx.items), desc=ctx.name, unit=records.unit)
    try:
        if ctx.options.backend == "local":
            stats = run_job(job, ctx.items, ctx.item_done, ctx.item_failed, bar=bar, model=model, flow=flow)
            done, failed, decoders = stats.done, stats.failed, stats.decoders
            counts = {"decoded_frames": stats.decoded_frames, "native_frames": stats.native_frames,
                      "flow_pairs": stats.flow_pairs}
        else:
            done, failed, decoders = _run_cluster(ctx, job, bar) if ctx.items else (0, 0, {})
            counts = {}
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    summary = summary_table(ctx.name, done=done, skipped=skipped, failed=failed, seconds=seconds)
    return {"summary": summary, "done": done, "skipped": skipped, "failed": failed,
            "seconds": round(seconds, 3), "decoders": decoders, "preset": preset.name,
            "feature_dim": attrs["feature_dim"], "streams": preset.streams, **counts}


def _create_store(job: ExtractJob, attrs: dict):
    from pipeline.store import create_store

    return create_store(job.out_dir, job.params.get("store", "zarr"), job.params.get("dtype", "float16"), attrs,
                        compression=job.params.get("compression", "none"))


def run_job(job: ExtractJob, items: Sequence[Item], item_done: Callable, item_failed: Callable,
            bar=None, model=None, flow=None):
    """Extract ``items`` into the job's store; returns the engine's stats."""
    import torch

    from extractors.decoding import DecodeSpec
    from extractors.engine import Engine, EngineConfig

    preset = resolve_preset(job.params, job.stage)
    if model is None:
        model, attrs = _model_and_attrs(preset, job)
        flow = _flow_computer(preset, job)
    else:
        attrs = _store_attrs(preset, job, model)
    attrs["flow_checkpoint_sha256"] = _flow_sha256(flow)
    store = _create_store(job, attrs)
    decoders = _decoders(job.runtime, job.stage)
    spec = DecodeSpec.from_preset(preset, decoders=decoders)
    device = torch.device(job.device)
    config = EngineConfig(device=device, batch_size=int(job.runtime.get("batch_size", 8)),
                          workers=job.workers, video_timeout_s=float(job.runtime.get("video_timeout_s", 600)))

    def on_done(item: Item, data, meta, seconds: float) -> None:
        try:
            record = job.records.write(store, item, data, meta, seconds, preset)
        except OSError as exc:  # a failed chunk write names no file: name the store
            if exc.filename is None:
                exc.filename = str(job.out_dir)
            raise
        item_done(item, record)

    threads = torch.get_num_threads()
    if device.type == "cpu" and job.workers:
        # Decode processes need cores too; inference takes what is left.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - job.workers))
    try:
        engine = Engine(model, preset, spec, config, job.records.output(model), flow=flow)
        return engine.run(job.records.tasks(items, preset), on_done, item_failed, bar=bar)
    finally:
        torch.set_num_threads(threads)
        store.close()


def _run_cluster(ctx: StageContext, job: ExtractJob, bar) -> tuple[int, int, dict]:
    """The items on a Ray or Dask cluster (``pipeline.executors``), one task per video (all keyframes
    of a video in one task: one decode pass), handed out as workers free up. Each task writes its
    items' data and then their records itself, where it runs, so a killed driver loses only the tasks
    in flight; results stream back here for the counts, the bar, the failures and ``--fail-fast``."""
    import contextlib

    from pipeline.executors import stream

    if ctx.params.get("store", "zarr") == "hdf5":
        raise ConfigError(f"{ctx.name}.store: hdf5 takes one writer at a time; use zarr with --backend "
                          f"{ctx.options.backend}")
    groups: dict[str, list[Item]] = {}
    for item in ctx.items:
        groups.setdefault(job.records.shard_key(item), []).append(item)
    done = failed = 0
    decoders: dict[str, int] = {}
    by_id = {item.id: item for item in ctx.items}
    results = stream(_extract_group, [(job, group) for group in groups.values()], backend=ctx.options.backend,
                     workers=max(1, ctx.options.workers), address=ctx.options.address,
                     gpus=ctx.options.gpus_per_task)
    with contextlib.closing(results):
        for (_, group), result, error in results:
            if error is not None:
                result = [], [(item.id, "worker_died", f"{type(error).__name__}: {error}") for item in group]
            records, failures = result
            for item_id, record in records:
                ctx.done_count += 1
                decoders[record["decoder"]] = decoders.get(record["decoder"], 0) + 1
                done += 1
                bar.update(1)
            for item_id, kind, message in failures:
                failed += 1
                bar.update(1)
                ctx.item_failed(by_id[item_id], kind, message)
    return done, failed, decoders


# One model (and flow estimator) per worker process, kept across its tasks: built once, not per video.
_WORKER_MODEL: dict = {}


def _extract_group(task) -> tuple[list, list]:
    """One task on a cluster worker: its items' data into the store, then each item's record.
    A rerun of the task (its first worker died) rewrites both whole: the writes are idempotent."""
    import multiprocessing

    from pipeline.context import write_item_record

    job, items = task
    # A daemonic worker (dask-worker's default) may not start a decode process: it decodes inline.
    decoders = 0 if multiprocessing.current_process().daemon else 1
    job = dataclasses.replace(job, workers=decoders, device=str(torch_device(job.device, f"{job.stage}.device")))
    key = (repr(sorted(job.params.items())), job.stage, job.device)
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()
        preset = resolve_preset(job.params, job.stage)
        _WORKER_MODEL[key] = (_model_and_attrs(preset, job)[0], _flow_computer(preset, job))
    records, failures = [], []

    def done(item: Item, record) -> None:
        records.append((item.id, write_item_record(job.out_dir / "items", item, record)))

    run_job(job, items, done, lambda item, kind, message: failures.append((item.id, kind, message)),
            model=_WORKER_MODEL[key][0], flow=_WORKER_MODEL[key][1])
    return records, failures


def _model_and_attrs(preset: Preset, job: ExtractJob):
    from extractors.registry import build_backbone

    kwargs = dict(preset.backbone_kwargs)
    if preset.streams != "rgb":
        kwargs["stream"] = {"flow": "flow", "both": "two_stream"}[preset.streams]
    weights = job.params.get("weights")
    if weights is not None:
        kwargs["weights"] = weights
    elif not kwargs.get("tiny"):
        # Features of a randomly initialised full-size network are noise that looks like data.
        from extractors.weights import needed_file, needed_for_preset

        if preset.streams == "both":
            needed = (f"rgb: {needed_file('i3d', 'rgb')}; flow: {needed_file('i3d', 'flow')}; pass --set "
                      f"{job.stage}.weights='{{rgb: PATH, flow: PATH}}'")
        else:
            # One I3D stream: its own files (a preset's list also names the other stream's and RAFT's).
            files = needed_file("i3d", preset.streams) if preset.backbone == "i3d" else \
                needed_for_preset(preset.name, preset.backbone)
            needed = f"{files}; pass --set {job.stage}.weights=PATH"
        raise ConfigError(f"{job.stage}.weights: preset {preset.name!r} runs the full {preset.backbone} and needs "
                          f"its checkpoint(s): {needed} (`pipeline weights` lists the files)")
    # The backbone built from the kwargs (e.g. a ViT-B variant of a ViT-g preset) decides the feature
    # dimension, strictly checked against the checkpoint while loading; the store records what it gives.
    model = build_backbone(preset.backbone, **kwargs)
    return model, _store_attrs(preset, job, model)


def _flow_computer(preset: Preset, job: ExtractJob):
    """The optical flow of a flow stream (None for RGB only); a missing estimator or RAFT checkpoint
    is a ConfigError before any video is opened."""
    if preset.streams == "rgb":
        return None
    import torch

    from extractors.flow import FlowComputer, tvl1_factory

    spec = preset.flow
    weights = job.params.get("flow_weights")
    if spec.estimator == "tvl1":
        tvl1_factory()
    elif weights is None and spec.arch != "tiny":
        from extractors.weights import needed_file

        raise ConfigError(f"extract.flow_weights: RAFT {spec.arch} with random weights gives no flow; needs "
                          f"{needed_file('raft', spec.arch)}; pass --set extract.flow_weights=PATH, or "
                          "--set extract.flow.estimator=tvl1")
    return FlowComputer(spec, torch.device(job.device), weights=weights,
                        batch_size=int(job.runtime.get("flow_batch_size", 8)))


def _flow_sha256(flow) -> str | None:
    if flow is None or not flow.weight_reports:
        return None
    return flow.weight_reports[0].sha256


def _store_attrs(preset: Preset, job: ExtractJob, model) -> dict:
    import av

    from pipeline import __version__

    decoders = _decoders(job.runtime, job.stage)
    versions = {"pyav": av.__version__}
    if "decord" in decoders:
        import decord

        versions["decord"] = decord.__version__
    attrs = preset.attrs()
    attrs.update({
        "fps": preset.fps,
        "feature_dim": int(model.feature_dim),
        "checkpoint_sha256": _weights_sha256(job.params.get("weights"), getattr(model, "weight_reports", ())),
        "decoder": decoders[0],
        "decoder_version": versions[decoders[0]],
        "decoder_versions": versions,
        "project_version": __version__,
        "dtype": job.params.get("dtype", "float16"),
        "resize_mode": preset.resize,
    })
    attrs.update(job.records.store_attrs(model))
    return attrs


def _weights_sha256(weights, reports=()) -> str | dict | list | None:
    """Digest of each checkpoint file ``weights`` names; files the backbone already hashed while
    loading (``model.weight_reports``) are not read again (a ViT-g checkpoint is several GB)."""
    if weights is None:
        return None
    from pipeline.checkpoints import sha256_file

    known = {report.path: report.sha256 for report in reports}

    def digest(path) -> str:
        return known.get(str(path)) or sha256_file(path)

    if isinstance(weights, Mapping):
        return {name: digest(path) for name, path in weights.items()}
    if isinstance(weights, (list, tuple)):
        return [digest(path) for path in weights]
    return digest(weights)


def _decoders(runtime: Mapping[str, Any], stage: str = "extract") -> tuple[str, ...]:
    from extractors.decoding import DECODERS, available_decoders

    wanted = tuple(runtime.get("decoders") or DECODERS)
    usable = available_decoders(wanted)
    if not usable:
        raise ConfigError(f"{stage}.decoders: none of {list(wanted)} can be imported here")
    return usable


def _cluster_device(device: str, gpus: float, stage: str) -> str:
    # The form of ``device`` was checked against the schema; here, only its fit with the GPU request.
    if gpus and device == "cpu":
        raise ConfigError(f"{stage}.device: cpu, but --gpus-per-task {gpus:g} asks for GPUs")
    if not gpus and str(device).startswith("cuda"):
        raise ConfigError(f"{stage}.device: {device} on a cluster needs --gpus-per-task (a task sees the GPUs "
                          f"it asked for)")
    return "cuda" if gpus and device == "auto" else str(device)


def summary_table(stage: str, *, done: int, skipped: int, failed: int, seconds: float) -> str:
    head = ("done", "skipped (cached)", "failed", "seconds")
    row = (str(done), str(skipped), str(failed), f"{seconds:.1f}")
    widths = [max(len(h), len(r)) for h, r in zip(head, row)]
    return "\n".join([f"{stage}: " + "  ".join(h.rjust(w) for h, w in zip(head, widths)),
                      " " * (len(stage) + 2) + "  ".join(r.rjust(w) for r, w in zip(row, widths))])
