"""Training loop: AdamW, linear warm-up then cosine (per iteration), gradient clipping, weight EMA,
loss normaliser; resumable from the checkpoint written atomically after every epoch.

Determinism: the shuffling and crops of epoch ``e`` come from ``numpy.random.default_rng([seed, e])``
and the torch RNG state (drop path) is checkpointed, so a run resumed after epoch ``e`` continues
exactly as the uninterrupted run (on CPU).

Data parallelism (called in each process of a ``torch.distributed`` group, see ``localizers.stage``):
every process draws the same order and crops and trains on its slice of each batch (the batch size is
the global one), counting the positives over the whole batch, so each step is the single-process step up
to float summation order (the drop path masks differ, being drawn per slice); the trainer wraps the
model in DistributedDataParallel and process 0 alone writes the checkpoint, the log and TensorBoard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

from localizers.actionformer import ActionFormer, LossNormalizer, collate, padded_length
from localizers.config import LocalizeConfig, ModelConfig, TrainConfig
from localizers.data import FeatureSource, VideoItem, batch_targets, random_crop, read_features
from localizers.models import model_module
from pipeline.trainer import LOG, EMA, Accumulated, CsvLog, EarlyStop, TensorBoard, Trainer, Validate, all_sum


def lr_at(step: int, cfg: TrainConfig, iters_per_epoch: int) -> float:
    """Linear warm-up from 0 over warmup_epochs, then cosine to eta_min, in iterations."""
    warm = cfg.warmup_epochs * iters_per_epoch
    total = cfg.total_epochs * iters_per_epoch
    if step < warm:
        return cfg.lr * step / max(warm - 1, 1)
    progress = (step - warm) / max(total - warm, 1)
    return cfg.eta_min + 0.5 * (cfg.lr - cfg.eta_min) * (1 + math.cos(math.pi * progress))


# A batch of unequal lengths is split into parts (one optimizer step accumulated over them, see
# ``Accumulated``) so that short videos are not padded to the longest: padded steps cost what valid
# ones cost. On THUMOS-like crops (2304 and 1000 steps, thumos_i3d, fp32, 2 threads, AMD EPYC) one padded
# batch took 6.4-6.9 CPU s per step, two parts 4.5-4.8; two equal lengths took the same either way. But
# a part also costs a fixed overhead, a few hundred ops dispatched each way: +25 ms per step with the
# demo's tiny model (0.6 -> 1.0 s per epoch, 2-core EPYC), which the padding it saves must outweigh.
# In forward multiply-adds (~30 G per CPU second for the forward and backward of thumos_i3d):
PART_OVERHEAD_MACS = 3e8


def forward_macs_per_step(mc: ModelConfig) -> float:
    """Rough forward multiply-adds per input step of the plain model: embedding convs, transformer blocks
    (projections and MLP) over the pyramid, the classification head's convs over every level."""
    d = mc.embed_dim
    n_embd, n_stem, n_branch = mc.backbone_arch
    block = (4 + 2 * mc.mlp_ratio) * d * d
    levels = sum(0.5 ** level for level in range(n_branch + 1))
    embed = (int(mc.input_dim) + (n_embd - 1) * d) * d * mc.embed_kernel
    return embed + (n_stem + levels - 1) * block + levels * (mc.head_layers - 1) * d * d * mc.head_kernel


def length_parts(lengths: Sequence[int], cfg: ModelConfig) -> list[list[int]]:
    """Indices of a training batch grouped into the parts that cost least: each part pays the overhead
    and its videos' steps padded to its longest. The best parts are runs of the videos sorted by padded
    length (found exactly by dynamic programming over the runs); in batch order within a part."""
    padded = [padded_length([n], cfg, training=True) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: -padded[i])
    per_step = forward_macs_per_step(cfg)
    # best[j]: the cost of the first j sorted videos; cut[j]: where their last part starts
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # the last part: sorted videos i .. j-1, padded to video i's length
            cost = best[i] + PART_OVERHEAD_MACS + (j - i) * padded[order[i]] * per_step
            if cost < best[j]:
                best[j], cut[j] = cost, i
    parts, j = [], len(order)
    while j:
        parts.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return parts[::-1]


class _PartCount:
    """The normaliser of a part of an accumulated step: counts its positives and divides by 1 (the
    summed gradients are divided by the batch's normaliser once every part has counted)."""

    def __init__(self):
        self.count = 0

    def update(self, num_pos: int) -> float:
        self.count += num_pos
        return 1.0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on convolution and linear weights only (backbone v2 has linear layers); none on
    biases, norms and scale parameters."""
    conv_weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))}
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
        max_epochs: int | None = None, board_dir: Path | None = None,
        validate: Callable[[nn.Module], float] | None = None) -> FitResult:
    """Train on ``items`` (features read from ``source``) with :class:`pipeline.trainer.Trainer`, writing
    ``checkpoint.pt`` (after every epoch) and ``train_log.csv`` into ``out_dir``; resumes from a
    checkpoint found there.

    ``max_epochs``: stop after that many epochs of the schedule (the schedule itself is unchanged),
    e.g. to time one epoch or to simulate an interruption. ``board_dir``: the TensorBoard run directory
    (default ``out_dir/tensorboard``). ``validate``: the EMA weights -> a metric (higher is better),
    logged as ``val_mAP`` every ``val_every`` epochs and driving ``early_stop`` (called in process 0 of a
    data-parallel group only).
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    tc, mc = cfg.train, cfg.model
    if not items:
        raise ValueError("no training videos")
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    torch.manual_seed(tc.seed)
    arch = model_module(cfg)  # ActionFormer or SnapFormer: the same loop, their own model and loss
    model = arch.build_model(cfg).to(device)
    regressed = getattr(arch, "regressed_points", None)  # segment models; SnapFormer has no regression head
    ema = EMA(model, tc.ema_decay)
    # fused: one kernel over all parameters; on CPU 47 against 128 CPU ms per step of thumos_i3d's 29 M
    # parameters for the per-parameter loop (2-core AMD EPYC)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, fused=True)
    normalizer = LossNormalizer(tc.loss_norm_init, tc.loss_norm_momentum)
    batch = min(tc.batch_size, len(items))
    if batch < world:
        raise ValueError(f"{world} processes need a batch of at least {world} videos, got {batch}")
    iters = len(items) // batch
    mine = np.array_split(np.arange(batch), world)[rank]  # this process's slice of every batch
    bf16 = use_bf16(tc.precision, device)
    non_blocking = device.type == "cuda"

    # the adaptive regression weight balances the whole batch's losses: it cannot be summed over parts.
    # CPU only: on a GPU a part's kernel launches cost more than THUMOS-sized padding's FLOPs (not measured)
    split = tc.reg_loss_weight > 0 and device.type == "cpu"

    def tensors(chosen, crops, norm):
        feats = [read_features(source, v, c.start, c.stop) for v, c in zip(chosen, crops)]
        x, mask = collate(feats, mc, training=True)
        if non_blocking:
            x = x.pin_memory()
        return (x.to(device, non_blocking=non_blocking), mask.to(device),
                *(t.to(device) for t in batch_targets(crops)), norm)

    def batches(epoch: int):
        rng = np.random.default_rng([tc.seed, epoch])
        order = rng.permutation(len(items))
        for it in range(iters):
            chosen = [items[i] for i in order[it * batch:(it + 1) * batch]]
            # every process draws every crop and splits the whole batch alike: the rng stays the same in
            # all of them, and all take an accumulated step (its collectives) or none
            crops = [random_crop(v, mc.max_seq_len, cfg.data.trunc_thresh, cfg.data.crop_ratio, rng) for v in chosen]
            parts = length_parts([c.stop - c.start for c in crops], mc) if split else [list(range(len(crops)))]
            if len(parts) == 1:
                yield tensors([chosen[i] for i in mine], [crops[i] for i in mine], normalizer)
                continue
            count = _PartCount()

            def finish(count: _PartCount = count) -> float:
                total = count.count if world == 1 else int(all_sum(torch.tensor(count.count, device=device)))
                return 1.0 / normalizer.update(total)

            parts = [[i for i in p if i in mine] for p in parts]
            yield Accumulated([tensors([chosen[i] for i in p], [crops[i] for i in p], count) for p in parts if p],
                              finish)

    def step(net: nn.Module, b) -> dict[str, torch.Tensor]:
        x, mask, segs, labels, valid, norm = b
        # the regression head runs at the positives only where the loss reads no other offsets
        need = regressed(mc, x.shape[1], segs, labels, valid, tc.center_radius) if regressed else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(x, mask) if need is None else net(x, mask, need)
        # a part's loss is its plain sum (its count is no collective); the whole batch's is normalised here
        return arch.compute_losses(out, segs, labels, valid, norm, tc,
                                   all_sum if world > 1 and norm is normalizer else None)

    hooks = [ema, CsvLog(out_dir / LOG), TensorBoard(board_dir or out_dir / "tensorboard")]
    if validate is not None and tc.val_every:
        hooks.append(Validate(lambda trainer: validate(ema.model), tc.val_every, key="val_mAP"))
        if tc.early_stop:
            hooks.append(EarlyStop("val_mAP", tc.early_stop))
    trainer = Trainer(model, optimizer, step, out_dir=out_dir, schedule=lambda s: lr_at(s, tc, iters) / tc.lr,
                      clip_grad=tc.clip_grad, hooks=hooks, stateful={"loss_norm": normalizer},
                      identity={"config": cfg.to_json(), "items": [it.id for it in items]}, name="localize",
                      log=log, epoch_values=lambda: {"loss_norm": normalizer.value})
    run = trainer.fit(batches, iters, tc.total_epochs, max_epochs)
    if note := ema_warning(trainer.step, tc.ema_decay):
        log(f"localize: warning: {note}")
    return FitResult(model, ema.model, run, trainer.times, trainer.step)
