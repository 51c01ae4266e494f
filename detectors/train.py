"""Training loop of a detection head on cached keyframe maps: the head's recipe (SGD or AdamW, linear
warm-up, cosine), gradient clipping, box jitter per step; resumable from the checkpoint written
atomically after every epoch.

Determinism: the order and the jitter of epoch ``e`` come from seeds ``[seed, e]``, so a run resumed
after epoch ``e`` continues as the uninterrupted run would (on CPU).
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from detectors.config import DetectConfig
from detectors.data import Keyframe, MapSource, collate

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.csv"


def class_loss(logits: torch.Tensor, targets: torch.Tensor, pose_cols: list[int] | None) -> torch.Tensor:
    """Multi-label BCE; with ``pose_cols`` ACAR-Net's variant: softmax cross-entropy over the pose
    classes (on actors with a pose label) plus BCE on the other classes."""
    if not pose_cols:
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)
    pose = torch.tensor(pose_cols, device=logits.device)
    rest = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    rest[pose] = False
    pose_t = targets[:, pose]
    has_pose = pose_t.sum(1) > 0
    loss = nn.functional.binary_cross_entropy_with_logits(logits[:, rest], targets[:, rest]) if rest.any() \
        else logits.new_zeros(())
    if has_pose.any():
        loss = loss + nn.functional.cross_entropy(logits[has_pose][:, pose], pose_t[has_pose].argmax(1))
    return loss


def class_scores(logits: torch.Tensor, pose_cols: list[int] | None) -> torch.Tensor:
    """Scores in [0, 1] matching ``class_loss``: sigmoid, with a softmax over the pose columns."""
    scores = torch.sigmoid(logits)
    if pose_cols:
        scores[:, pose_cols] = torch.softmax(logits[:, pose_cols], dim=1)
    return scores


def _lr_at(step: int, base: float, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _optimizer(head: nn.Module, cfg: DetectConfig, recipe: dict | None) -> torch.optim.Optimizer:
    """Weight decay on weights of two or more dimensions only (not biases and norm scales)."""
    decay = [p for p in head.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in head.parameters() if p.requires_grad and p.ndim <= 1]
    wd = float(cfg.recipe_value("weight_decay", recipe))
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    lr = float(cfg.recipe_value("lr", recipe))
    if cfg.recipe_value("optimizer", recipe) == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def fit(cfg: DetectConfig, head: nn.Module, keyframes: Sequence[Keyframe], source: MapSource, out_dir: Path,
        pose_cols: list[int] | None, log: Callable[[str], None] = print) -> list[float]:
    """Train ``head`` in place; returns the seconds of each epoch run now."""
    out_dir = Path(out_dir)
    recipe = dict(getattr(head, "recipe", None) or {})
    optimizer = _optimizer(head, cfg, recipe)
    base_lr = float(cfg.recipe_value("lr", recipe))
    schedule = cfg.recipe_value("schedule", recipe)
    batch = min(cfg.batch_size, len(keyframes))
    iters = len(keyframes) // batch
    warmup = int(round(float(cfg.recipe_value("warmup_epochs", recipe)) * iters))
    total = cfg.epochs * iters
    ids = [k.rid for k in keyframes]
    start, step = 0, 0
    ckpt = out_dir / CHECKPOINT
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["config"] != cfg.to_json() or state["keyframes"] != ids:
            raise ValueError(f"{ckpt}: checkpoint of another configuration or keyframe list; remove it to retrain")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        start, step = state["epoch"] + 1, state["step"]
        log(f"detect: resuming after epoch {start}/{cfg.epochs}")
    params = [p for p in head.parameters() if p.requires_grad]
    times = []
    head.train()
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(keyframes))
        generator = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        losses = []
        for it in range(iters):
            chosen = [keyframes[i] for i in order[it * batch:(it + 1) * batch]]
            inputs, targets = collate(chosen, source, cfg.box_jitter, generator)
            for g in optimizer.param_groups:
                g["lr"] = _lr_at(step, base_lr, warmup, total, schedule)
            optimizer.zero_grad(set_to_none=True)
            loss = class_loss(head(inputs), targets, pose_cols)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            optimizer.step()
            losses.append(loss.detach())
            step += 1
        seconds = time.perf_counter() - t0
        times.append(seconds)
        mean_loss = float(torch.stack(losses).mean())  # one host sync per epoch
        state = {"epoch": epoch, "step": step, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                 "config": cfg.to_json(), "keyframes": ids}
        _atomic_save(state, ckpt)
        _append_csv(out_dir / LOG, {"epoch": epoch + 1, "step": step, "loss": mean_loss,
                                    "lr": optimizer.param_groups[0]["lr"], "seconds": seconds})
        log(f"detect: epoch {epoch + 1}/{cfg.epochs} loss {mean_loss:.4f} {seconds:.1f}s")
    head.eval()
    return times


@torch.no_grad()
def predict(head: nn.Module, keyframes: Sequence[Keyframe], source: MapSource, pose_cols: list[int] | None,
            batch_size: int) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(video, timestamp) -> (boxes (N, 4), class scores (N, K)) for every keyframe."""
    head.eval()
    out = {}
    for i in range(0, len(keyframes), batch_size):
        chosen = keyframes[i:i + batch_size]
        inputs, _ = collate(chosen, source)
        scores = class_scores(head(inputs), pose_cols).numpy()
        start = 0
        for k in chosen:
            out[(k.video, k.timestamp)] = (k.boxes, scores[start:start + len(k.boxes)])
            start += len(k.boxes)
    return out


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
