"""Published training recipes of the heads, in epochs and per published batch so that they scale to a
cache of any size: ``scaled(batch_clips)`` applies the linear lr scaling rule, ``param_groups`` the
weight-decay exclusions and lr factors, ``lr_factor(epoch)`` the warm-up and schedule."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from torch import nn


@dataclass(frozen=True)
class Recipe:
    optimizer: str                 # sgd | adamw
    lr: float                      # at batch_clips clips per step
    batch_clips: int
    epochs: float
    weight_decay: float
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "steps"        # steps | cosine
    milestones: tuple[float, ...] = ()  # epochs at which lr is multiplied by `gamma` (steps)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start: float = 1.0      # lr factor at epoch 0, rising linearly to 1 at warmup_epochs
    grad_clip: float | None = None
    no_decay: tuple[str, ...] = ()              # regexes on parameter names: weight decay 0
    lr_factors: tuple[tuple[str, float], ...] = ()  # (regex, factor); factors of every match multiply

    def scaled(self, batch_clips: int) -> "Recipe":
        """The same recipe at another batch size (linear scaling rule)."""
        return replace(self, lr=self.lr * batch_clips / self.batch_clips, batch_clips=batch_clips)

    def lr_factor(self, epoch: float) -> float:
        """Multiplier of ``lr`` at fractional ``epoch`` (warm-up, then steps or cosine to 0 at ``epochs``)."""
        if epoch < self.warmup_epochs:
            return self.warmup_start + (1.0 - self.warmup_start) * epoch / self.warmup_epochs
        if self.schedule == "cosine":
            span = max(self.epochs - self.warmup_epochs, 1e-12)
            progress = min((epoch - self.warmup_epochs) / span, 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.gamma ** sum(epoch >= m for m in self.milestones)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """One optimizer group per (lr, weight decay) pair, in parameter order."""
        groups: dict[tuple[float, float], list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            lr = self.lr
            for pattern, factor in self.lr_factors:
                if re.search(pattern, name):
                    lr *= factor
            wd = 0.0 if any(re.search(p, name) for p in self.no_decay) else self.weight_decay
            groups.setdefault((lr, wd), []).append(param)
        return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
