"""Backbone names as written in YAML -> the module function that builds them (imported lazily)."""

from __future__ import annotations

import importlib

from pipeline.errors import ConfigError

BACKBONES = {
    "i3d": "extractors.i3d:build",
    "slowfast": "extractors.slowfast:build",
    "r2plus1d_34": "extractors.r2plus1d:build",
    "videomae": "extractors.videomae:build",
}


def build_backbone(name: str, **kwargs):
    """Build a backbone by name. kwargs: see each module's ``build`` (tiny, weights, strict, ...)."""
    try:
        target = BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)(**kwargs)
