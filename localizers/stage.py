"""Stage entries of the localizer: ``train(ctx)`` (stage ``localize``) and ``evaluate(ctx)`` (``localize_eval``).

torch is imported inside the functions: the CLI imports this module while planning.

Outputs of ``localize``: ``config.json`` (resolved config, classes, the extract store it read, and under
``params`` the resolved values of this stage and extract: a valid ``--config`` file),
``checkpoint.pt`` (after every epoch, for resuming), ``train_log.csv``, ``model.pt`` (final weights and
EMA weights). ``localize.nproc`` > 1 trains on that many local processes, started by torch's elastic
launcher (what ``torchrun`` runs): gloo on CPU, nccl on CUDA with one GPU per process. Under ``torchrun``
(the CLI on every process, ``pipeline.distributed``) rank 0 runs this stage and every rank trains.
Outputs of ``localize_eval``: ``detections.json`` (ActivityNet submission format), the same
detections as ``results.pkl`` (ActionFormer's) and ``detections_thumos14.txt`` (THUMOS14's evaluator),
and ``metrics.json`` (mAP per tIoU and per-class AP over the videos that have features). With point-event
annotations (SnapFormer): ``detections.json`` holds ``{"label", "score", "timestamp"}`` events and
``metrics.json`` the spotting mAP per time tolerance (``localizers.point_map``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Mapping

from pipeline import distributed
from pipeline.context import StageContext, save_torch_atomic, write_json_atomic
from pipeline.device import stage_device
from pipeline.errors import ConfigError

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"


def _annotations(ctx: StageContext):
    from pipeline.annotations import load_temporal

    if ctx.dataset.annotations is None:
        raise ConfigError(f"{ctx.dataset.path}: annotations: needed by stage {ctx.name}")
    return load_temporal(ctx.dataset.annotations)


def _subset(ctx: StageContext, ann, split: str) -> tuple[str, dict]:
    splits = ctx.dataset.splits or {}
    if split not in splits:
        raise ConfigError(f"{ctx.dataset.path}: splits: no {split!r} split (has {sorted(splits)})")
    videos = ann.subset(splits[split])
    if not videos:
        raise ConfigError(f"{ann.path}: no video of subset {splits[split]!r} (split {split!r})")
    return splits[split], videos


def _items(store, videos: Mapping, cfg, label_index, where: str, check_segments: bool, log,
           ann_points: bool = False) -> list:
    from localizers.data import make_item

    present = [vid for vid in sorted(videos) if vid in store]
    missing = len(videos) - len(present)
    if missing:
        absent = [vid for vid in sorted(videos) if vid not in store]
        named = ", ".join(absent[:3]) + (", ..." if missing > 3 else "")
        log(f"localize: {missing} of {len(videos)} annotated videos have no features in {store.path}; "
            f"left out ({named})")
    if not present:
        raise ConfigError(f"{where}: none of the {len(videos)} videos has features in the extract store")
    if cfg.model.num_classes == 1:  # class-agnostic (ActivityNet with external video-level scores)
        label_index = {name: 0 for name in label_index}
    items = [make_item(vid, store.shape(vid), store.grid(vid), videos[vid].duration, videos[vid].segments,
                       videos[vid].labels, label_index, cfg.model.input_dim, cfg.model.strides[-1],
                       cfg.data.resize_to, where=where, check_segments=check_segments,
                       outside=cfg.data.segments_outside, features=str(store.path), points=ann_points)
             for vid in present]
    dropped = sum(len(videos[vid].segments) for vid in present) - sum(len(item.segments) for item in items)
    if dropped:
        log(f"localize: {dropped} segments outside their videos left out (localize.segments_outside=drop)")
    return items


def train(ctx: StageContext) -> dict:
    import torch

    from localizers.config import resolve
    from pipeline.store import open_stage_store
    from pipeline.store.loader import FeatureReader

    nproc, world = int(ctx.runtime.get("nproc", 1)), distributed.world_size()
    if world > 1 and nproc > 1:
        raise ConfigError(f"localize.nproc: {nproc} under torchrun, which started {world} processes already; "
                          "leave it at 1")
    procs = max(nproc, world)
    cfg = resolve(ctx.params)
    ann = _annotations(ctx)
    _check_model(cfg, ann)
    subset, videos = _subset(ctx, ann, "train")
    extract_dir = Path(ctx.upstream["extract"])
    with open_stage_store(extract_dir) as store:  # training reads through its own FeatureReader
        feature_dim = store.attrs.get("feature_dim") or store.shape(store.videos()[0])[1]
        cfg = cfg.with_dims(int(feature_dim), len(ann.classes))
        items = _items(store, videos, cfg, ann.label_index(), str(ann.path), True, ctx.log, ann.points)
        cfg, auto_ranges = _auto_ranges(cfg, items, ctx.log)
        val = None
        if cfg.train.val_every:
            val_subset, val_videos = _subset(ctx, ann, "val")
            val_items = _items(store, val_videos, cfg, ann.label_index(), str(ann.path), False, ctx.log, ann.points)
            val = (ann, val_subset, val_items)
    if procs > min(cfg.train.batch_size, len(items)):
        raise ConfigError(f"{'torchrun' if world > 1 else 'localize.nproc'}: {procs} processes split each batch "
                          f"of {min(cfg.train.batch_size, len(items))} videos; at most that many")
    out = Path(ctx.out_dir)
    write_json_atomic(out / CONFIG_FILE, {
        "config": cfg.to_json(), "classes": list(ann.classes), "train_subset": subset,
        "train_videos": [it.id for it in items],
        # relative: the cache may move as a whole
        "extract_dir": os.path.relpath(extract_dir, out.parent / ctx.key),
        # what made this model, by stage: `pipeline run ... --config <this file>` makes it again
        "params": dict(ctx.config),
        **({"regression_ranges_auto": auto_ranges} if auto_ranges else {}),
    })
    device = stage_device(ctx.name, ctx.runtime, ctx.log)
    local = int(os.environ["LOCAL_WORLD_SIZE"]) if world > 1 else nproc  # the processes of this machine
    if device.type == "cuda" and local > torch.cuda.device_count():
        raise ConfigError(f"{'torchrun' if world > 1 else 'localize.nproc'}: {local} processes need one GPU "
                          f"each; {torch.cuda.device_count()} visible")
    if not (out / MODEL_FILE).exists():
        ctx.log(f"localize: training {cfg.preset} on {len(items)} videos of {subset} "
                f"({cfg.train.total_epochs} epochs, {device}"
                + (f", {procs} processes" + (" (torchrun)" if world > 1 else "") if procs > 1 else "") + ")")
        source = FeatureReader(extract_dir, [it.id for it in items], ctx.runtime.get("in_memory", "auto"))
        if val is not None:  # the val split's features, read by process 0 only
            val = (*val, FeatureReader(extract_dir, [it.id for it in val[2]], "auto"))
        job = (cfg, items, source, out, ctx.board_dir, list(ann.classes), val)
        threads = max(1, torch.get_num_threads() // local)  # the stage's threads, shared by the processes
        if world > 1:  # every torchrun process joins
            distributed.run_everywhere(_fit_rank, device.type, threads, not ctx.options.json, job)
        elif nproc == 1:
            _fit_and_save(*job, device=device, log=ctx.log)
        else:
            _launch(nproc, device, threads, not ctx.options.json, job)
    last = _last_log_row(out / "train_log.csv")
    model = "" if cfg.model.model == "actionformer" else f" ({cfg.model.model})"
    summary = (f"localize: {cfg.preset}{model}, {len(items)} training videos, {cfg.train.total_epochs} epochs, "
               f"final loss {float(last.get('loss', 'nan')):.4f}")
    return {"summary": summary, "videos": len(items), "epochs": cfg.train.total_epochs,
            "final_loss": float(last.get("loss", "nan"))}


def _check_model(cfg, ann) -> None:
    """Segments need a segment model, point events (``timestamp``) SnapFormer."""
    points = cfg.model.model == "snapformer"
    if points != ann.points:
        raise ConfigError(f"localize.model: {cfg.model.model} "
                          + ("spots point events; " if points else "localizes segments; ")
                          + f"{ann.path} has " + ("point events ('timestamp'): --set localize.model=snapformer"
                                                  if ann.points else "segments"))


def _auto_ranges(cfg, items: list, log):
    """``regression_ranges: auto`` resolved from the training items (logged); the config and what was
    computed (recorded in config.json), or the config unchanged and None."""
    from dataclasses import replace

    from localizers.config import validate
    from localizers.data import auto_regression_ranges

    m = cfg.model
    if m.regression_ranges != "auto":
        return cfg, None
    ranges, quantiles = auto_regression_ranges(items, m.num_levels, m.max_seq_len)
    segments = sum(len(it.segments) for it in items)
    log(f"localize: regression_ranges auto from {segments} training segments: half-length quantiles "
        f"{', '.join(f'{q:.1f}' for q in quantiles)} -> {[list(r) for r in ranges]}")
    cfg = replace(cfg, model=replace(m, regression_ranges=ranges))
    validate(cfg)
    return cfg, {"ranges": [list(r) for r in ranges], "segments": segments, "half_length_quantiles": quantiles}


def _fit_and_save(cfg, items, source, out: Path, board_dir, classes: list, val=None, *, device, log) -> None:
    """Train, then write ``model.pt`` (in process 0 of a data-parallel group). ``val``: None, or the
    annotations, subset, items and feature source of the periodic validation."""
    from torch import distributed as dist

    from localizers.train import fit

    validate = _validator(cfg, *val, device) if val is not None else None
    result = fit(cfg, items, source, out, device=device, log=log, board_dir=board_dir, validate=validate)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    save_torch_atomic({"model": result.model.state_dict(), "ema": result.ema.state_dict(), "steps": result.steps,
                       "config": cfg.to_json(), "classes": classes}, out / MODEL_FILE)


def _launch(nproc: int, device, threads: int, verbose: bool, job: tuple) -> None:
    """``_fit_rank`` on ``nproc`` local processes through torch's elastic launcher, as ``torchrun
    --standalone --nproc_per_node nproc`` would start them."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"localize-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, _fit_rank)(device.type, threads, verbose, job)
    except ChildFailedError as e:  # the failed process's traceback is on stderr already
        message = e.get_first_failure()[1].message  # the error file's record, or a line
        message = message.get("message", message) if isinstance(message, dict) else message
        raise RuntimeError(f"localize: a training process failed: {message}") from None


def _fit_rank(device_type: str, threads: int, verbose: bool, job: tuple) -> None:
    """One process of data-parallel training (the launcher, ours or torchrun, set its rank, world size
    and rendezvous in the environment)."""
    import warnings

    import torch
    from torch import distributed as dist

    # depthwise conv weights (C, 1, k): strides differing only along the size-1 dim, the same layout
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
    local = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        loud = verbose and dist.get_rank() == 0
        log = (lambda m: print(m, file=sys.stderr, flush=True)) if loud else (lambda m: None)
        _fit_and_save(*job, device=device, log=log)
    finally:
        dist.destroy_process_group()


def _validator(cfg, ann, subset: str, items: list, source, device):
    """EMA weights -> mAP@0.5 on the ``val`` split (the periodic validation of training); for point
    events, the spotting mAP averaged over the default tolerances."""
    from localizers.anet_map import evaluate_detections
    from localizers.models import model_module
    from localizers.point_map import evaluate_points

    arch = model_module(cfg)

    def metric(model) -> float:
        dets = {it.id: arch.video_detections(model, source, it, cfg.test, ann.classes, device=device)
                for it in items}
        if ann.points:
            return evaluate_points(ann, dets, subset=subset, only_videos=dets).average_mAP
        return float(evaluate_detections(ann, dets, subset=subset, tious=[0.5], only_videos=dets).mAP[0])

    return metric


def _last_log_row(path: Path) -> dict:
    import csv

    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def evaluate(ctx: StageContext) -> dict:
    from dataclasses import replace

    from localizers.actionformer import load_video_scores
    from localizers.anet_map import ANET_TIOUS, THUMOS_TIOUS, evaluate_detections
    from localizers.point_map import TOLERANCES_S, evaluate_points
    from localizers.checkpoint_compat import load_checkpoint
    from pipeline.untrusted import load_torch
    from localizers.config import LocalizeConfig, validate
    from localizers.formats import write_results_pickle, write_thumos_txt
    from localizers.models import model_module
    from localizers.train import ema_warning
    from pipeline.schema import apply
    from pipeline.store import open_stage_store

    params = dict(ctx.params)  # checked against localizers.config.EvalParams when the run was planned
    split = params.get("split", "test")
    weights = params.get("weights", "ema")
    train_dir = Path(ctx.upstream["localize"])
    with open(train_dir / CONFIG_FILE) as f:
        saved = json.load(f)
    cfg = LocalizeConfig.from_json(saved["config"])
    cfg = replace(cfg, test=apply(cfg.test, params))  # the test settings set here, over the trained ones
    validate(cfg)
    if cfg.model.num_classes == 1 and len(saved["classes"]) > 1 and not cfg.test.ext_score_file:
        raise ConfigError("localize_eval.ext_score_file: a class-agnostic model (num_classes 1) needs "
                          "video-level class scores to label its detections")
    tious = params.get("tious") or (ANET_TIOUS if cfg.data.resize_to else THUMOS_TIOUS)
    ann = _annotations(ctx)
    _check_model(cfg, ann)
    for param, for_points in (("tious", False), ("tolerances", True)):
        if params.get(param) is not None and ann.points != for_points:
            raise ConfigError(f"localize_eval.{param}: {ann.path} has "
                              + ("point events, scored at time tolerances (localize_eval.tolerances)" if ann.points
                                 else "segments, scored at tIoU thresholds (localize_eval.tious)"))
    arch = model_module(cfg)
    if list(ann.classes) != saved["classes"]:
        raise ConfigError(f"{ann.path}: classes differ from the ones the model was trained on")
    subset, videos = _subset(ctx, ann, split)
    with open_stage_store(train_dir / saved["extract_dir"]) as store:
        items = _items(store, videos, cfg, ann.label_index(), str(ann.path), False, ctx.log, ann.points)
        device = stage_device(ctx.name, ctx.runtime, ctx.log)
        model = arch.build_model(cfg).to(device).eval()
        # an official epoch_034.pth.tar (or another model.pt) may replace the trained weights
        checkpoint = Path(params.get("checkpoint") or train_dir / MODEL_FILE)
        if not checkpoint.is_file():
            raise ConfigError(f"{checkpoint}: checkpoint file not found")
        state = load_torch(checkpoint)  # a downloaded file: weights only, never its code
        load_checkpoint(model, state, weights, where=str(checkpoint))
        if weights == "ema" and (note := ema_warning(state.get("steps"), cfg.train.ema_decay)):
            ctx.log(f"localize_eval: warning: {note}")
        ext = load_video_scores(cfg.test.ext_score_file, ann.classes) if cfg.test.ext_score_file else None
        results = {item.id: arch.video_detections(model, store, item, cfg.test, ann.classes, ext, device)
                   for item in ctx.progress(items, total=len(items), desc="localize_eval", unit="video")}
    out = Path(ctx.out_dir)
    write_json_atomic(out / "detections.json", {"version": "VERSION 1.3", "results": results, "external_data": {}})
    # Videos without features have no detections: evaluated, they would count as misses of the model.
    if ann.points:  # events, not segments: the segment formats (pickle, THUMOS14 text) do not apply
        metrics = evaluate_points(ann, results, subset=subset, only_videos=results, dataset=ctx.dataset.name,
                                  tolerances=params.get("tolerances") or TOLERANCES_S)
        headline = {f"mAP@{t:g}s": m for t, m in zip(metrics.tolerances, metrics.mAP.tolist())}
    else:
        write_results_pickle(out / "results.pkl", results, ann.classes)
        write_thumos_txt(out / "detections_thumos14.txt", results, ann.classes)
        metrics = evaluate_detections(ann, results, subset=subset, tious=tious, only_videos=results,
                                      dataset=ctx.dataset.name)
        headline = {"mAP@0.5": dict(zip([round(t, 2) for t in metrics.tious], metrics.mAP.tolist())).get(0.5)}
    # what a PR plot needs to evaluate the detections again (pipeline compare --plot)
    write_json_atomic(out / "metrics.json", {**metrics.to_json(), "annotations": str(ann.path), "subset": subset})
    summary = metrics.table()
    if metrics.n_videos < len(videos):
        summary = (f"localize_eval: evaluated {metrics.n_videos} of the {len(videos)} videos of split {split} "
                   f"({subset}): the others have no features\n" + summary)
    return {"summary": summary, **headline, "average_mAP": float(metrics.average_mAP),
            "videos": len(items), "split_videos": len(videos), "weights": weights}
