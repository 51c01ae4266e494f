"""TBTFormer (Tang et al. 2023): ActionFormer whose regression head predicts, per boundary, a
distribution over the distances ``0 .. reg_max`` (in strides of the point's level) instead of one
distance; the offset is the distribution's expectation (trained with the IoU loss) and the distribution
itself with the distribution focal loss (``dfl_weight``). Its scaled backbone (``n_head`` 16,
``mlp_ratio`` 6) and cross-scale FPN (``fpn: bifpn``) are options of every model of the family.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

# its losses (the distribution focal loss is in compute_losses, on boundary_logits) and decoding are
# ActionFormer's: the registry finds them here
from localizers.actionformer import ActionFormer, Outputs, compute_losses, regressed_points, video_detections
from localizers.config import LocalizeConfig, ModelConfig
from localizers.heads import RegHead
from localizers.losses import expected_distance

__all__ = ["TBTFormer", "build_model", "compute_losses", "regressed_points", "video_detections"]


class TBTFormer(ActionFormer):
    @staticmethod
    def make_reg_head(cfg: ModelConfig) -> nn.Module:
        # logits, not distances: no ReLU; the per-level Scale acts as a temperature of the distributions
        return RegHead(cfg.embed_dim, cfg.embed_dim, cfg.num_levels, cfg.head_layers, cfg.head_kernel,
                       out_channels=2 * (cfg.reg_max + 1), activation=False)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor, regress_at: torch.Tensor | None = None) -> Outputs:
        out = super().forward(feats, mask, regress_at)
        logits = out.offsets.unflatten(-1, (2, self.cfg.reg_max + 1))
        return dataclasses.replace(out, offsets=expected_distance(logits), boundary_logits=logits)


def build_model(cfg: LocalizeConfig | ModelConfig) -> TBTFormer:
    return TBTFormer(cfg.model if isinstance(cfg, LocalizeConfig) else cfg)
