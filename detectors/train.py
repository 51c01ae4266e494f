"""Training of a detection head on cached keyframe maps with :class:`pipeline.trainer.Trainer`: the
head's published recipe (optimiser, parameter groups, warm-up and schedule, gradient clipping) scaled
to the batch, the head's own loss, box jitter per step; resumable from the checkpoint written
atomically after every epoch.

Determinism: the order and the jitter of epoch ``e`` come from seeds ``[seed, e]`` and the torch RNG
state (dropout) is checkpointed, so a run resumed after epoch ``e`` continues as the uninterrupted run
would (on CPU). CycleACR's memory bank is rebuilt at the start of every epoch from the checkpointed
head (in eval mode, which draws no random numbers), so it resumes the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from detectors.config import DetectConfig
from detectors.data import Keyframe, MapSource, collate
from detectors.heads.base import ActorMemory
from detectors.recipes import Recipe
from pipeline.trainer import LOG, CsvLog, TensorBoard, Trainer


def _optimizer(head: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = recipe.param_groups(head)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    return torch.optim.AdamW(groups, lr=recipe.lr)


def actor_bank(head: nn.Module, keyframes: Sequence[Keyframe], source: MapSource,
               batch_size: int) -> dict[tuple[str, int], torch.Tensor]:
    """CycleACR's long-term memory bank: (video, timestamp) -> the head's pooled actor features (n, D) of
    that keyframe's boxes (unjittered), computed from the cache in eval mode, kept on the CPU.

    The published pool is refreshed with each step's detached features; one pass per epoch gives every
    keyframe features of the same head, needs no neighbour's map at a step, and is reproducible."""
    was_training = head.training
    head.eval()
    device = next(head.parameters()).device
    bank = {}
    with torch.no_grad():
        for i in range(0, len(keyframes), batch_size):
            chosen = keyframes[i:i + batch_size]
            inputs, _ = collate(chosen, source)
            feats = head.memory_features(inputs.to(device)).cpu()
            start = 0
            for k in chosen:
                bank[(k.video, k.timestamp)] = feats[start:start + len(k.boxes)]
                start += len(k.boxes)
    head.train(was_training)
    return bank


def _remember(inputs, chosen: Sequence[Keyframe], head: nn.Module, bank) -> None:
    """Attach the memory of the clips ``chosen`` (the head's window around each) from ``bank``."""
    inputs.memory = ActorMemory.gather(bank, [(k.video, k.timestamp) for k in chosen], head.memory_length,
                                       head.max_per_sec, head.dim_inner)


def fit(cfg: DetectConfig, recipe: Recipe, head: nn.Module, keyframes: Sequence[Keyframe], source: MapSource,
        out_dir: Path, log: Callable[[str], None] = print, max_epochs: int | None = None,
        board_dir: Path | None = None) -> list[float]:
    """Train ``head`` (on its device) in place with ``recipe``; returns the seconds of each epoch run now.
    ``max_epochs``: stop after that many epochs of the schedule (the schedule itself is unchanged);
    ``board_dir``: a TensorBoard run directory for the epochs' scalars (none without it)."""
    out_dir = Path(out_dir)
    device = next(head.parameters()).device
    batch = min(cfg.batch_size, len(keyframes))
    iters = len(keyframes) // batch

    def batches(epoch: int):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(keyframes))
        generator = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        bank = actor_bank(head, keyframes, source, batch) if cfg.memory else None
        for it in range(iters):
            chosen = [keyframes[i] for i in order[it * batch:(it + 1) * batch]]
            inputs, targets = collate(chosen, source, cfg.box_jitter, generator)
            if bank is not None:
                _remember(inputs, chosen, head, bank)
            yield inputs.to(device), targets.to(device)

    def step(net: nn.Module, b) -> dict[str, torch.Tensor]:
        inputs, targets = b
        return {"loss": net.loss(net(inputs), targets)}

    trainer = Trainer(head, _optimizer(head, recipe), step, out_dir=out_dir,
                      schedule=lambda s: recipe.lr_factor(s / iters), clip_grad=recipe.grad_clip or 0.0,
                      hooks=[CsvLog(out_dir / LOG)] + ([TensorBoard(board_dir)] if board_dir else []),
                      identity={"config": cfg.to_json(), "keyframes": [k.rid for k in keyframes]},
                      name="detect", log=log)
    trainer.fit(batches, iters, int(recipe.epochs), max_epochs)  # whole epochs: DetectConfig.recipe rounds
    return trainer.times


@torch.no_grad()
def predict(head: nn.Module, keyframes: Sequence[Keyframe], source: MapSource, batch_size: int,
            memory: bool = False) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(video, timestamp) -> (boxes (N, 4), class scores (N, K)) for every keyframe. ``memory``: CycleACR's
    two-stage inference, a bank of the head's features over ``keyframes`` first, then the scores."""
    head.eval()
    device = next(head.parameters()).device
    bank = actor_bank(head, keyframes, source, batch_size) if memory else None
    out = {}
    for i in range(0, len(keyframes), batch_size):
        chosen = keyframes[i:i + batch_size]
        inputs, _ = collate(chosen, source)
        if bank is not None:
            _remember(inputs, chosen, head, bank)
        scores = head.scores(head(inputs.to(device))).cpu().numpy()
        start = 0
        for k in chosen:
            out[(k.video, k.timestamp)] = (k.boxes, scores[start:start + len(k.boxes)])
            start += len(k.boxes)
    return out
