"""What a record stores: the model's per-clip outputs and how a record is assembled from its clips.

- :class:`ClipVectors` (``extract``): ``model(clips)`` -> one C-vector per clip; a video's record is the
  (T, C) matrix of its clips in grid order (a plain feature store).
- :class:`KeyframeMaps` (``extract_keyframes``): ``model.forward_keyframe(clips)`` -> per clip a C x H x W
  map averaged over time and C x T context tokens max-pooled over space; a keyframe's record is its
  one clip's ``{"map", "context"}`` (a store with those fields).

``forward`` returns field name -> tensor with the clips on the first axis; the engine keeps each
field's rows per video in float32 and hands the rows of a finished record to ``record``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from pipeline.errors import ConfigError


class ClipVectors:
    """``extract``'s output: a plain (T, C) store."""

    def forward(self, model: torch.nn.Module, clips: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model(clips)
        if out.dim() != 2:
            raise RuntimeError(f"backbone returned shape {tuple(out.shape)} for {len(clips)} clips")
        return {"features": out}

    def record(self, rows: Mapping[str, np.ndarray]) -> np.ndarray:
        return rows["features"]


class KeyframeMaps:
    """``extract_keyframes``' output: a store of these fields, one record per keyframe id."""

    fields = {"map": ["C", "H", "W"], "context": ["C", "T"]}
    index = "keyframe"

    def __init__(self, model: torch.nn.Module):
        if not hasattr(model, "forward_keyframe"):
            raise ConfigError(f"extract_keyframes: backbone {type(model).__name__} gives no feature map; "
                              "use slowfast or videomae")

    def forward(self, model: torch.nn.Module, clips: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap, context = model.forward_keyframe(clips)
        return {"map": fmap, "context": context}

    def record(self, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: rows[name][0] for name in self.fields}
