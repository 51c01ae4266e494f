"""The localizer registry: ``localize.model`` names the module of a family member, which provides
``build_model``, ``compute_losses`` and ``video_detections`` (the training loop and the evaluation
stage call these and nothing model-specific). Full module names: the stage key's code graph follows
registry strings, so every member's code is in the key."""

from __future__ import annotations

import importlib
from types import ModuleType

from localizers.config import LocalizeConfig, ModelConfig

MODELS = {"actionformer": "localizers.actionformer", "tbtformer": "localizers.tbtformer",
          "snapformer": "localizers.snapformer"}


def model_module(cfg: LocalizeConfig | ModelConfig) -> ModuleType:
    model_cfg = cfg.model if isinstance(cfg, LocalizeConfig) else cfg
    return importlib.import_module(MODELS[model_cfg.model])


def build_model(cfg: LocalizeConfig | ModelConfig):
    """The model of a resolved config (``input_dim`` / ``num_classes`` set, see ``LocalizeConfig.with_dims``)."""
    return model_module(cfg).build_model(cfg)
