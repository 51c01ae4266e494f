"""Loading the official ActionFormer checkpoints (``epoch_034.pth.tar``) into our model, strictly.

The official ``train.py`` saves ``{"epoch", "state_dict", "state_dict_ema", "scheduler", "optimizer"}``
from an ``nn.DataParallel`` wrapper, so both weight dicts carry a ``module.`` prefix. Our parameter
names and shapes are the official ones (see tests/fixtures/actionformer_thumos_i3d.json), so the key map
is only that prefix; every missing, unexpected or mis-shaped key is reported at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from pipeline.errors import ConfigError

PREFIX = "module."
WEIGHTS = {"ema": "state_dict_ema", "model": "state_dict"}


def official_state_dict(checkpoint: Mapping, which: str = "ema") -> dict[str, torch.Tensor]:
    """The ``which`` weights (ema | model) of an official checkpoint dict, with the prefix removed.
    A bare state dict (ours, or already unwrapped) is returned as it is, prefix removed."""
    if which not in WEIGHTS:
        raise ValueError(f"which must be one of {sorted(WEIGHTS)}")
    key = WEIGHTS[which]
    if key in checkpoint:
        sd = checkpoint[key]
    elif which in checkpoint and isinstance(checkpoint[which], Mapping):  # our model.pt
        sd = checkpoint[which]
    else:
        sd = checkpoint
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in sd.items()}


def load_checkpoint(model: nn.Module, source: str | Path | Mapping, which: str = "ema",
                    where: str | None = None) -> None:
    """Load an official (or our) checkpoint into ``model`` strictly; ConfigError lists every problem
    (naming ``where``, or the file)."""
    where = where or (str(source) if isinstance(source, (str, Path)) else "checkpoint")
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise ConfigError(f"{source}: checkpoint file not found")
        from pipeline.untrusted import load_torch

        source = load_torch(source)  # a downloaded file: weights only, never its code
    if not isinstance(source, Mapping):
        raise ConfigError(f"{where}: expected a checkpoint dict, found {type(source).__name__}")
    sd = official_state_dict(source, which)
    odd = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ConfigError(f"{where}: not a state dict: {', '.join(map(str, odd[:5]))} hold no tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected)}"] if unexpected else []) + \
               ([f"shape mismatch {'; '.join(shapes)}"] if shapes else [])
    if problems:
        raise ConfigError(f"{where}: does not fit the ActionFormer model: {' | '.join(problems)}")
    model.load_state_dict(sd, strict=True)
