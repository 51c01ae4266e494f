"""Training loop of a detection head on cached keyframe maps: the head's published recipe (optimiser,
parameter groups, warm-up and schedule, gradient clipping) scaled to the batch, the head's own loss, box
jitter per step; resumable from the checkpoint written atomically after every epoch.

Determinism: the order and the jitter of epoch ``e`` come from seeds ``[seed, e]`` and the torch RNG
state (dropout) is checkpointed, so a run resumed after epoch ``e`` continues as the uninterrupted run
would (on CPU). CycleACR's memory bank is rebuilt at the start of every epoch from the checkpointed
head (in eval mode, which draws no random numbers), so it resumes the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from detectors.config import DetectConfig
from detectors.data import Keyframe, MapSource, collate
from detectors.recipes import Recipe
from pipeline.context import append_csv_row, save_torch_atomic

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.csv"


def _optimizer(head: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = recipe.param_groups(head)
    for g in groups:
        g["base_lr"] = g["lr"]
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
    from detectors.heads import ActorMemory

    inputs.memory = ActorMemory.gather(bank, [(k.video, k.timestamp) for k in chosen], head.memory_length,
                                       head.max_per_sec, head.dim_inner)


def fit(cfg: DetectConfig, recipe: Recipe, head: nn.Module, keyframes: Sequence[Keyframe], source: MapSource,
        out_dir: Path, log: Callable[[str], None] = print, max_epochs: int | None = None) -> list[float]:
    """Train ``head`` (on its device) in place with ``recipe``; returns the seconds of each epoch run now.
    ``max_epochs``: stop after that many epochs of the schedule (the schedule itself is unchanged)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(head.parameters()).device
    optimizer = _optimizer(head, recipe)
    epochs = int(recipe.epochs)  # whole: DetectConfig.recipe rounds it
    batch = min(cfg.batch_size, len(keyframes))
    iters = len(keyframes) // batch
    ids = [k.rid for k in keyframes]
    start, step = 0, 0
    ckpt = out_dir / CHECKPOINT
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state["config"] != cfg.to_json() or state["keyframes"] != ids:
            raise ValueError(f"{ckpt}: checkpoint of another configuration or keyframe list; remove it to retrain")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"].cpu())  # dropout continues as if never stopped
        start, step = state["epoch"] + 1, state["step"]
        log(f"detect: resuming after epoch {start}/{epochs}")
    params = [p for p in head.parameters() if p.requires_grad]
    times = []
    head.train()
    for epoch in range(start, epochs if max_epochs is None else min(epochs, max_epochs)):
        t0 = time.perf_counter()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(keyframes))
        generator = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        losses = []
        bank = actor_bank(head, keyframes, source, batch) if cfg.memory else None
        for it in range(iters):
            chosen = [keyframes[i] for i in order[it * batch:(it + 1) * batch]]
            inputs, targets = collate(chosen, source, cfg.box_jitter, generator)
            if bank is not None:
                _remember(inputs, chosen, head, bank)
            inputs, targets = inputs.to(device), targets.to(device)
            factor = recipe.lr_factor(step / iters)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            optimizer.zero_grad(set_to_none=True)
            loss = head.loss(head(inputs), targets)
            loss.backward()
            if recipe.grad_clip:
                nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            optimizer.step()
            losses.append(loss.detach())
            step += 1
        seconds = time.perf_counter() - t0
        times.append(seconds)
        mean_loss = float(torch.stack(losses).mean())  # one host sync per epoch
        state = {"epoch": epoch, "step": step, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng_torch": torch.get_rng_state(), "config": cfg.to_json(), "keyframes": ids}
        save_torch_atomic(state, ckpt)
        append_csv_row(out_dir / LOG, {"epoch": epoch + 1, "step": step, "loss": mean_loss,
                                    "lr": optimizer.param_groups[0]["lr"], "seconds": seconds})
        log(f"detect: epoch {epoch + 1}/{epochs} loss {mean_loss:.4f} {seconds:.1f}s")
    head.eval()
    return times


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
