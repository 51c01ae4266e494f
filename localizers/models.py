"""The localizer registry: ``localize.model`` names the model class of the ActionFormer family."""

from __future__ import annotations

from localizers.actionformer import ActionFormer
from localizers.config import LocalizeConfig, ModelConfig
from localizers.tbtformer import TBTFormer

MODELS: dict[str, type[ActionFormer]] = {"actionformer": ActionFormer, "tbtformer": TBTFormer}


def build_model(cfg: LocalizeConfig | ModelConfig) -> ActionFormer:
    """The model of a resolved config (``input_dim`` / ``num_classes`` set, see ``LocalizeConfig.with_dims``)."""
    model_cfg = cfg.model if isinstance(cfg, LocalizeConfig) else cfg
    return MODELS[model_cfg.model](model_cfg)
