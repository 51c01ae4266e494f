"""Stage entries of detection: ``train(ctx)`` (stage ``detect``) and ``evaluate(ctx)`` (``detect_eval``).

Both read the keyframe store of ``extract_keyframes`` only: the backbone is never loaded, so a change of
head or head parameter retrains in seconds to minutes and never re-extracts. torch is imported inside
the functions: the CLI imports this module while planning.

Outputs of ``detect``: ``config.json`` (resolved config, label ids, the keyframe store it read),
``checkpoint.pt`` (after every epoch, for resuming), ``train_log.csv``, ``model.pt`` (final head; with
``weights``, the released head as loaded, nothing trained).
Outputs of ``detect_eval``: ``detections.csv`` (official AVA format) and ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline.context import StageContext, save_torch_atomic, write_json_atomic
from pipeline.device import stage_device
from pipeline.errors import ConfigError

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
STORE_STAGE = "extract_keyframes"


def _split(ctx: StageContext, name: str):
    from pipeline.ava import load_split

    split = load_split(ctx.dataset, name)
    for line in split.log_lines():
        ctx.log(f"{ctx.name}: {line}")
    return split


def _build_head(cfg, reader, ids: tuple[int, ...]):
    """The head of ``cfg`` for ``ids`` (sorted label ids; AVA groups them pose, object, person, which
    the pose-softmax and focal losses rely on) on the records of ``reader``: their channels and, for a
    head that sizes by it, the length of their context tokens."""
    import inspect

    from detectors.heads import HEADS, build_head
    from detectors.losses import ava_groups

    try:
        groups = ava_groups(ids)
    except ValueError as exc:
        groups = None
        if cfg.loss in ("pose_softmax", "focal"):
            raise ConfigError(f"detect.loss: {cfg.loss}: {exc}") from None
    kwargs = {"in_channels": int(reader.attrs["feature_dim"]), "num_classes": len(ids)}
    accepted = inspect.signature(HEADS[cfg.head]).parameters
    if "temporal_len" in accepted and reader.ids:
        kwargs["temporal_len"] = int(reader.read(reader.ids[0])["context"].shape[-1])
    if groups is not None:
        kwargs["num_pose"] = groups[0]
        if "class_groups" in accepted:
            kwargs["class_groups"] = groups
    if cfg.loss is not None:
        kwargs["loss"] = cfg.loss
    kwargs.update(cfg.head_kwargs)
    unknown = sorted(set(cfg.head_kwargs) - set(accepted))
    if unknown:  # here, not at planning: the heads' modules import torch, which planning never does
        raise ConfigError(f"detect.head_kwargs.{unknown[0]}: not a parameter of head {cfg.head} "
                          f"({', '.join(p for p in accepted if p != 'self')})")
    try:
        return build_head(cfg.head, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"detect.head: {cfg.head}: {exc}") from None


def released_weights(head: str, path: str, channels: int) -> dict:
    """The state dict of the released ``head`` file ``path`` (read weights-only), refused in one line
    naming ``detect.weights`` when the head has no released layout or the file was built for maps with
    other channels than the keyframe store's ``channels`` (the published heads take SlowFast R50's 2304)."""
    from detectors.heads import HEADS
    from pipeline.checkpoints import read_checkpoint, unwrap_state_dict

    cls = HEADS[head]
    if not cls.released:
        known = ", ".join(n for n, c in HEADS.items() if c.released)
        raise ConfigError(f"detect.weights: head {head} has no released weights (those of {known} do)")
    state = unwrap_state_dict(read_checkpoint(path, needed=cls.released_file), source=path)
    got = cls.released_channels(state)
    if got is not None and got != channels:
        raise ConfigError(f"detect.weights: {path} holds {head} weights for {got}-channel maps, but the keyframe "
                          f"store has {channels} channels")
    return state


def check_store(params: dict, stores: dict[str, Path]) -> None:
    """Planning check of ``detect`` (``DetectConfig.check_inputs``): released weights against the keyframe
    store's channels when the store is already built, so a mismatch fails before any work."""
    from pipeline.store.loader import RecordReader

    if params.get("weights") is not None and STORE_STAGE in stores:
        released_weights(params["head"], params["weights"],
                         int(RecordReader(stores[STORE_STAGE]).attrs["feature_dim"]))


def _load_released(ctx: StageContext, cfg, head, config: dict, n_params: int) -> dict:
    """``detect`` with ``weights``: the released head loaded strictly and kept as the stage's model."""
    from pipeline.checkpoints import load_state_dict_checked, sha256_file

    state = released_weights(cfg.head, cfg.weights, config["feature_dim"])
    fmt, _, _ = load_state_dict_checked(head, state, head.released, source=cfg.weights, target=cfg.head)
    out = Path(ctx.out_dir)
    write_json_atomic(out / CONFIG_FILE, {**config, "keyframes": 0, "weights_sha256": sha256_file(cfg.weights)})
    save_torch_atomic({"head": head.state_dict(), "config": cfg.to_json(), "class_ids": config["class_ids"],
                       "feature_dim": config["feature_dim"], "seconds_per_epoch": [], "train_seconds": 0.0},
                      out / MODEL_FILE)
    ctx.log(f"detect: {cfg.head} ({n_params:,} parameters) loaded from {cfg.weights} ({fmt} layout), not trained")
    return {"summary": f"detect: released {cfg.head} ({n_params:,} parameters) from {cfg.weights}, not trained",
            "head": cfg.head, "parameters": n_params, "keyframes": 0, "boxes": 0, "epochs": 0}


def train(ctx: StageContext) -> dict:
    import torch

    from detectors.config import detect_config
    from detectors.data import MapSource, class_ids, training_keyframes
    from detectors.train import fit
    from pipeline.store.loader import RecordReader

    cfg = detect_config(ctx.params)
    device = stage_device(ctx.name, ctx.runtime, ctx.log)
    split = _split(ctx, "train")
    ids = class_ids(split.labelmap)
    store_dir = Path(ctx.upstream[STORE_STAGE])
    reader = RecordReader(store_dir)
    feature_dim = int(reader.attrs["feature_dim"])
    torch.manual_seed(cfg.seed)
    head = _build_head(cfg, reader, ids).to(device)  # a bad head, loss or argument fails before any work
    out = Path(ctx.out_dir)
    config = {"config": cfg.to_json(), "class_ids": list(ids),
              "labelmap": {str(i): split.labelmap[i] for i in ids}, "feature_dim": feature_dim,
              "train_split": split.name,
              "store_dir": os.path.relpath(store_dir, out.parent / ctx.key)}  # relative: the cache may move whole
    n_params = sum(p.numel() for p in head.parameters())
    if cfg.weights is not None:
        return _load_released(ctx, cfg, head, config, n_params)
    recipe = cfg.recipe(head.recipe, cfg.batch_size)
    epochs = int(recipe.epochs)
    keyframes = training_keyframes(split, set(reader.ids), cfg.boxes, cfg.min_score, ctx.log)
    if not keyframes:
        raise ConfigError(f"{ctx.dataset.path}: no keyframe of split {split.name} with boxes is in the keyframe "
                          f"store ({len(reader.ids)} records)")
    source = MapSource(reader, [k.rid for k in keyframes])
    write_json_atomic(out / CONFIG_FILE, {**config, "keyframes": len(keyframes)})
    boxes = sum(len(k.boxes) for k in keyframes)
    if not (out / MODEL_FILE).exists():
        ctx.log(f"detect: training {cfg.head} ({n_params:,} parameters) on {len(keyframes)} keyframes, {boxes} "
                f"boxes of {split.name} ({epochs} epochs, batch {cfg.batch_size} clips, {recipe.optimizer} "
                f"lr {recipe.lr:g}, {device})")
        t0 = time.perf_counter()
        times = fit(cfg, recipe, head, keyframes, source, out, log=ctx.log, board_dir=ctx.board_dir)
        save_torch_atomic({"head": head.state_dict(), "config": cfg.to_json(), "class_ids": list(ids),
                           "feature_dim": feature_dim, "seconds_per_epoch": times,
                           "train_seconds": time.perf_counter() - t0}, out / MODEL_FILE)
        per_epoch = times
    else:  # a run that died after writing the model: its times are in the file
        per_epoch = torch.load(out / MODEL_FILE, map_location="cpu", weights_only=True)["seconds_per_epoch"]
    seconds = sum(per_epoch) / len(per_epoch) if per_epoch else float("nan")
    summary = (f"detect: {cfg.head} ({n_params:,} parameters), {len(keyframes)} keyframes / {boxes} boxes, "
               f"{epochs} epochs, {seconds:.2f} s per epoch")
    return {"summary": summary, "head": cfg.head, "parameters": n_params, "keyframes": len(keyframes),
            "boxes": boxes, "epochs": epochs, "seconds_per_epoch": seconds}


def evaluate(ctx: StageContext) -> dict:
    import torch

    from detectors.ava_map import DetectionRows, evaluate_frame_map, write_detections_csv
    from detectors.config import DetectConfig, detect_config, eval_config
    from detectors.data import MapSource, class_ids, eval_keyframes
    from detectors.train import predict
    from pipeline.store.loader import RecordReader

    ecfg = eval_config(ctx.params)
    device = stage_device(ctx.name, ctx.runtime, ctx.log)
    train_dir = Path(ctx.upstream["detect"])
    saved = json.loads((train_dir / CONFIG_FILE).read_text())
    cfg: DetectConfig = detect_config(saved["config"])
    split = _split(ctx, ecfg.split)
    ids = class_ids(split.labelmap)
    if list(ids) != saved["class_ids"]:
        raise ConfigError(f"{ctx.dataset.ava.labelmap}: label ids differ from the ones the head was trained on")
    reader = RecordReader(train_dir / saved["store_dir"])
    keyframes = eval_keyframes(split, set(reader.ids), ecfg.boxes, ecfg.min_score, ctx.log)
    head = _build_head(cfg, reader, ids)
    head.load_state_dict(torch.load(train_dir / MODEL_FILE, map_location="cpu", weights_only=True)["head"])
    head.to(device)
    source = MapSource(reader, [k.rid for k in keyframes])
    t0 = time.perf_counter()
    detections = predict(head, keyframes, source, cfg.batch_size, memory=cfg.memory)
    infer_s = time.perf_counter() - t0
    out = Path(ctx.out_dir)
    rows = DetectionRows.from_keyframes(detections, split.labelmap)
    write_detections_csv(out / "detections.csv", rows)
    result = evaluate_frame_map(split.gt, rows, split.labelmap, split.exclusions, protocol=ecfg.protocol)
    metrics = {**result.to_json(), "split": split.name, "boxes": ecfg.boxes, "keyframes": len(keyframes),
               "head": cfg.head, "inference_seconds": infer_s}
    write_json_atomic(out / "metrics.json", metrics)
    return {"summary": result.table(), "mAP": result.mAP, "keyframes": len(keyframes), "head": cfg.head}
