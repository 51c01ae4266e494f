"""Detection heads by YAML name: ``build_head(name, **cfg)``. Every head maps a ``HeadInput`` to logits
(R, num_classes) and has ``loss(logits, targets)``, ``scores(logits)``, ``recipe`` and
``load_released(path)``."""

from __future__ import annotations

from detectors.heads.acar import ACARHead
from detectors.heads.acrn import ACRNHead
from detectors.heads.base import ActorMemory, ClipLayout, Head, HeadInput
from detectors.heads.cycleacr import CycleACRHead
from detectors.heads.roi_linear import RoILinearHead

HEADS: dict[str, type[Head]] = {
    "roi_linear": RoILinearHead,
    "acrn": ACRNHead,
    "acar": ACARHead,
    "cycleacr": CycleACRHead,
}


def build_head(name: str, **cfg) -> Head:
    """The head registered as ``name`` built with ``cfg`` (its constructor's keyword arguments)."""
    if name not in HEADS:
        raise ValueError(f"unknown detection head {name!r}; known: {', '.join(HEADS)}")
    return HEADS[name](**cfg)


__all__ = ["HEADS", "ActorMemory", "ClipLayout", "Head", "HeadInput", "build_head"]
