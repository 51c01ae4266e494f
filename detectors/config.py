"""The configuration of the detect stages: typed frozen dataclasses, the single source of their field
names and defaults (stages.yaml lists the same names with ``null`` = the default here), validated once.

The optimiser fields left ``None`` take the head's published recipe (``head.recipe``, scaled to the
batch size by the linear rule), so ``--set detect.head=acar`` brings ACAR-Net's optimiser and schedule and
``--set detect.lr=...`` still overrides one field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from pipeline.errors import ConfigError

BOX_SOURCES = ("gt", "proposals")
LOSSES = ("bce", "pose_softmax", "focal")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("steps", "cosine")
PROTOCOLS = ("official", "mmaction2")
# DetectConfig field -> Recipe field it overrides
RECIPE_FIELDS = {"optimizer": "optimizer", "lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum",
                 "warmup_epochs": "warmup_epochs", "schedule": "schedule", "epochs": "epochs",
                 "clip_grad": "grad_clip"}


@dataclass(frozen=True)
class DetectConfig:
    """``detect`` (training) params."""

    head: str = "roi_linear"  # a name of the detectors.heads registry
    head_kwargs: Mapping[str, Any] = field(default_factory=dict)  # passed to build_head
    batch_size: int = 8  # clips (keyframes) per step, each with all its actors
    epochs: float | None = None  # None: the recipe's (rounded to whole epochs)
    optimizer: str | None = None  # sgd | adamw
    lr: float | None = None  # at batch_size clips (None: the recipe's, scaled linearly)
    weight_decay: float | None = None
    momentum: float | None = None
    warmup_epochs: float | None = None
    schedule: str | None = None  # steps | cosine
    clip_grad: float | None = None  # max gradient norm (0: off)
    loss: str | None = None  # bce | pose_softmax (ACAR-Net) | focal (CycleACR); None: the head's
    boxes: str = "gt"  # training boxes: gt | proposals (above min_score, labelled by IoU >= 0.5, + GT)
    min_score: float = 0.9  # proposal score threshold for training
    box_jitter: float = 0.075  # each side moved by U(-j, j) x box size, per step, on the cached map
    seed: int = 0

    def recipe(self, published, batch_clips: int):
        """The head's published ``Recipe`` scaled to ``batch_clips``, with this config's overrides."""
        recipe = published.scaled(batch_clips)
        overrides = {r: getattr(self, f) for f, r in RECIPE_FIELDS.items() if getattr(self, f) is not None}
        return replace(recipe, **overrides)

    def to_json(self) -> dict:
        out = asdict(self)
        out["head_kwargs"] = dict(self.head_kwargs)
        return out


@dataclass(frozen=True)
class DetectEvalConfig:
    """``detect_eval`` params."""

    split: str = "test"  # a role of the manifest's splits, or a split name
    boxes: str = "proposals"  # proposals (when the split has them, else gt) | gt
    min_score: float = 0.85  # proposal score threshold at evaluation (LFB / ACAR-Net val: 0.85)
    protocol: str = "official"  # official | mmaction2


def _build(cls, params: Mapping[str, Any], stage: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"{stage}.{unknown[0]}: unknown parameter; known: {', '.join(known)}")
    values = {k: v for k, v in params.items() if v is not None}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{stage}: {exc}") from None


def _check(stage: str, name: str, ok: bool, why: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{stage}.{name}: {why} (got {value!r})")


def detect_config(params: Mapping[str, Any]) -> DetectConfig:
    """The ``detect`` params (None: the default) as a validated DetectConfig."""
    cfg = _build(DetectConfig, params, "detect")
    s = "detect"
    _check(s, "head", isinstance(cfg.head, str) and cfg.head, "a head name", cfg.head)
    _check(s, "head_kwargs", isinstance(cfg.head_kwargs, Mapping), "a mapping of head arguments", cfg.head_kwargs)
    _check(s, "batch_size", isinstance(cfg.batch_size, int) and not isinstance(cfg.batch_size, bool)
           and cfg.batch_size > 0, "a positive integer", cfg.batch_size)
    _check(s, "optimizer", cfg.optimizer in (None, *OPTIMIZERS), f"one of {', '.join(OPTIMIZERS)}", cfg.optimizer)
    _check(s, "schedule", cfg.schedule in (None, *SCHEDULES), f"one of {', '.join(SCHEDULES)}", cfg.schedule)
    _check(s, "loss", cfg.loss in (None, *LOSSES), f"one of {', '.join(LOSSES)}", cfg.loss)
    _check(s, "boxes", cfg.boxes in BOX_SOURCES, f"one of {', '.join(BOX_SOURCES)}", cfg.boxes)
    for name in ("epochs", "lr", "weight_decay", "momentum", "warmup_epochs", "clip_grad", "box_jitter",
                 "min_score"):
        value = getattr(cfg, name)
        _check(s, name, value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and value >= 0), "a number >= 0", value)
    for name in ("epochs", "lr"):
        _check(s, name, getattr(cfg, name) is None or getattr(cfg, name) > 0, "a positive number", getattr(cfg, name))
    _check(s, "box_jitter", cfg.box_jitter < 0.5, "a fraction of the box size below 0.5", cfg.box_jitter)
    return replace(cfg, head_kwargs=dict(cfg.head_kwargs))


def eval_config(params: Mapping[str, Any]) -> DetectEvalConfig:
    cfg = _build(DetectEvalConfig, params, "detect_eval")
    s = "detect_eval"
    _check(s, "split", isinstance(cfg.split, str) and cfg.split, "a split name", cfg.split)
    _check(s, "boxes", cfg.boxes in BOX_SOURCES, f"one of {', '.join(BOX_SOURCES)}", cfg.boxes)
    _check(s, "protocol", cfg.protocol in PROTOCOLS, f"one of {', '.join(PROTOCOLS)}", cfg.protocol)
    _check(s, "min_score", isinstance(cfg.min_score, (int, float)) and 0 <= cfg.min_score <= 1,
           "a score in [0, 1]", cfg.min_score)
    return cfg
