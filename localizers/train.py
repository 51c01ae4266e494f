"""Training loop: AdamW, linear warm-up then cosine (per iteration), gradient clipping, weight EMA,
loss normaliser; resumable from the checkpoint written atomically after every epoch.

Determinism: the shuffling and crops of epoch ``e`` come from ``numpy.random.default_rng([seed, e])``
and the torch RNG state (drop path) is checkpointed, so a run resumed after epoch ``e`` continues
exactly as the uninterrupted run (on CPU).

Data parallelism (called in each process of a ``torch.distributed`` group, see ``localizers.stage``):
every process draws the same order and crops, trains a DistributedDataParallel model on its slice of each
batch (the batch size is the global one) and counts the positives over the whole batch, so each step is
the single-process step up to float summation order (the drop path masks differ, being drawn per slice);
process 0 alone writes the checkpoint, the log and TensorBoard.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from localizers.actionformer import ActionFormer, LossNormalizer, build_model, collate, compute_losses, regressed_points
from localizers.config import LocalizeConfig, TrainConfig
from localizers.data import FeatureSource, VideoItem, batch_targets, random_crop, read_features
from pipeline.context import append_csv_row, save_torch_atomic
from pipeline.progress import progress

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.csv"
LOSS_KEYS = ("loss", "cls_loss", "reg_loss")


def lr_at(step: int, cfg: TrainConfig, iters_per_epoch: int) -> float:
    """Linear warm-up from 0 over warmup_epochs, then cosine to eta_min, in iterations."""
    warm = cfg.warmup_epochs * iters_per_epoch
    total = cfg.total_epochs * iters_per_epoch
    if step < warm:
        return cfg.lr * step / max(warm - 1, 1)
    progress = (step - warm) / max(total - warm, 1)
    return cfg.eta_min + 0.5 * (cfg.lr - cfg.eta_min) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on convolution weights only; none on biases, LayerNorm and scale parameters."""
    conv_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv1d)}
    decay = [p for p in model.parameters() if id(p) in conv_weights]
    no_decay = [p for p in model.parameters() if id(p) not in conv_weights]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # AMX makes bf16 GEMMs several times faster than fp32 on CPU; without it bf16 is no gain
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


@dataclass
class FitResult:
    model: ActionFormer
    ema: ActionFormer
    epochs_run: int
    seconds_per_epoch: list[float]
    steps: int = 0  # optimizer steps of the whole schedule so far (the EMA's age)


# An EMA still holding this much of the random initial weights scores far below the raw weights (a
# 42-step run of the demo: 0.24 mAP with EMA, 73.92 without).
EMA_INIT_SHARE = 0.05


def ema_warning(steps: int | None, decay: float) -> str | None:
    """Why EMA weights after ``steps`` steps are not yet meaningful, or None when they are."""
    if steps is None or decay <= 0:
        return None
    share = decay ** steps
    if share <= EMA_INIT_SHARE:
        return None
    return (f"the EMA weights are {share:.0%} the random initial weights after {steps} steps with decay "
            f"{decay}; their scores mean little: train longer or evaluate the raw weights "
            f"(--set localize_eval.weights=model)")


def fit(cfg: LocalizeConfig, items: Sequence[VideoItem], source: FeatureSource, out_dir: Path,
        device: str | torch.device = "cpu", log: Callable[[str], None] = print,
        max_epochs: int | None = None, board_dir: Path | None = None) -> FitResult:
    """Train on ``items`` (features read from ``source``), writing ``checkpoint.pt`` (after every epoch)
    and ``train_log.csv`` into ``out_dir``; resumes from a checkpoint found there.

    ``max_epochs``: stop after that many epochs of the schedule (the schedule itself is unchanged),
    e.g. to time one epoch or to simulate an interruption. ``board_dir``: the TensorBoard run directory
    (default ``out_dir/tensorboard``).
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tc, mc = cfg.train, cfg.model
    if not items:
        raise ValueError("no training videos")
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    torch.manual_seed(tc.seed)
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr)
    normalizer = LossNormalizer(tc.loss_norm_init, tc.loss_norm_momentum)
    batch = min(tc.batch_size, len(items))
    if batch < world:
        raise ValueError(f"{world} processes need a batch of at least {world} videos, got {batch}")
    iters = len(items) // batch
    mine = np.array_split(np.arange(batch), world)[rank]  # this process's slice of every batch
    start_epoch, step = 0, 0
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)  # ours, yet no code either
        if state["config"] != cfg.to_json() or state["items"] != [it.id for it in items]:
            raise ValueError(f"{ckpt_path}: checkpoint of another configuration or video list; remove it to retrain")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        normalizer.value = state["loss_norm"]
        torch.set_rng_state(state["rng_torch"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start_epoch, step = state["epoch"] + 1, state["step"]
        if rank == 0:
            _trim_csv(out_dir / LOG, start_epoch)
        log(f"localize: resuming after epoch {state['epoch'] + 1}/{tc.total_epochs}")
    bf16 = use_bf16(tc.precision, device)
    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()]
    end_epoch = tc.total_epochs if max_epochs is None else min(tc.total_epochs, max_epochs)
    log_path = out_dir / LOG
    times = []
    model.train()
    # DDP averages the gradients over the processes; each loss is its slice's share of the batch's loss
    # (a sum), hence the loss times the number of processes
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    board_cm = _tensorboard(board_dir or out_dir / "tensorboard") if rank == 0 else contextlib.nullcontext()
    with board_cm as board:  # one writer (one event file) per run
        for epoch in range(start_epoch, end_epoch):
            t0 = time.perf_counter()
            rng = np.random.default_rng([tc.seed, epoch])
            order = rng.permutation(len(items))
            running = torch.zeros(len(LOSS_KEYS), device=device)
            bar = (progress(range(iters), total=iters, desc=f"epoch {epoch + 1}/{tc.total_epochs}", unit="step")
                   if rank == 0 else range(iters))
            for it in bar:
                chosen = [items[i] for i in order[it * batch:(it + 1) * batch]]
                # every process draws every crop: the rng stays the same in all of them
                crops = [random_crop(v, mc.max_seq_len, cfg.data.trunc_thresh, cfg.data.crop_ratio, rng)
                         for v in chosen]
                chosen, crops = [chosen[i] for i in mine], [crops[i] for i in mine]
                feats = [read_features(source, v, c.start, c.stop) for v, c in zip(chosen, crops)]
                x, mask = collate(feats, mc, training=True)
                segs, labels, valid = batch_targets(crops)
                non_blocking = device.type == "cuda"
                if non_blocking:
                    x = x.pin_memory()
                x, mask = x.to(device, non_blocking=non_blocking), mask.to(device)
                segs, labels, valid = segs.to(device), labels.to(device), valid.to(device)
                lr = lr_at(step, tc, iters)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                # the regression head runs at the positives only: the loss reads no other offsets
                need = regressed_points(mc, x.shape[1], segs, labels, valid, tc.center_radius)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    out = net(x, mask, need)
                losses = compute_losses(out, segs, labels, valid, normalizer, tc,
                                        _all_sum if world > 1 else None)
                (losses["loss"] * world if world > 1 else losses["loss"]).backward()
                if tc.clip_grad > 0:
                    nn.utils.clip_grad_norm_(params, tc.clip_grad)
                optimizer.step()
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - tc.ema_decay)
                step += 1
                # summed on the device: one read of the three sums per epoch, for the log
                running = running + torch.stack([losses[k].detach().float() for k in LOSS_KEYS])
            seconds = time.perf_counter() - t0
            sums = dict(zip(LOSS_KEYS, (_all_sum(running) if world > 1 else running).tolist()))
            times.append(seconds)
            row = {"epoch": epoch + 1, "step": step, "lr": lr_at(step - 1, tc, iters),
                   **{k: v / iters for k, v in sums.items()}, "loss_norm": normalizer.value, "seconds": seconds}
            state = {"epoch": epoch, "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                     "optimizer": optimizer.state_dict(), "loss_norm": normalizer.value,
                     "rng_torch": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     "config": cfg.to_json(), "items": [it.id for it in items]}
            if rank == 0:
                save_torch_atomic(state, ckpt_path)
                append_csv_row(log_path, row)
                _log_scalars(board, row)
            eta = sum(times) / len(times) * (end_epoch - epoch - 1)
            log(f"localize: epoch {epoch + 1}/{tc.total_epochs} loss {row['loss']:.4f} "
                f"(cls {row['cls_loss']:.4f} reg {row['reg_loss']:.4f}) lr {row['lr']:.2e} {seconds:.1f}s"
                + (f", eta {_duration(eta)}" if epoch + 1 < end_epoch else ""))
    model.eval()
    if note := ema_warning(step, tc.ema_decay):
        log(f"localize: warning: {note}")
    return FitResult(model, ema, end_epoch - start_epoch, times, step)


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _trim_csv(path: Path, last_epoch: int) -> None:
    """Drop log rows of epochs after the checkpoint (a crash between the checkpoint and the log)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if int(r["epoch"]) <= last_epoch]
    if len(kept) != len(rows):
        path.unlink()
        for r in kept:
            append_csv_row(path, r)


def _tensorboard(board_dir: Path):
    """A SummaryWriter into ``board_dir`` (a context manager), or a null context yielding None without
    tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return contextlib.nullcontext()
    return SummaryWriter(str(board_dir))


def _log_scalars(writer, row: dict) -> None:
    if writer is None:
        return
    for key in ("loss", "cls_loss", "reg_loss", "lr", "seconds"):
        writer.add_scalar(key, row[key], row["epoch"])
    writer.flush()  # the epoch's scalars are on disk with its checkpoint
