"""The configuration of the detect stages: typed frozen dataclasses, the single source of their field
names and defaults (stages.yaml lists the same names with ``null`` = the default here), validated once.

Fields left ``None`` in ``DetectConfig`` take the head's published recipe (``head.recipe``), then the
fallback below, so ``--set detect.head=acar`` brings its optimiser and schedule, and ``--set detect.lr=..``
still overrides one field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from pipeline.errors import ConfigError

BOX_SOURCES = ("gt", "proposals")
LOSSES = ("bce", "pose_softmax")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
PROTOCOLS = ("official", "mmaction2")
AVA_POSE_MAX_ID = 14  # AVA's ids 1..14 are the mutually exclusive pose classes
# Used where neither the config nor the head's recipe names a value.
FALLBACK_RECIPE = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 1.0,
                   "schedule": "cosine"}


@dataclass(frozen=True)
class DetectConfig:
    """``detect`` (training) params."""

    head: str = "roi_linear"  # a name of the detectors.heads registry
    head_kwargs: Mapping[str, Any] = field(default_factory=dict)  # passed to build_head
    epochs: int = 12
    batch_size: int = 8  # clips (keyframes) per step, each with all its actors
    optimizer: str | None = None  # sgd | adamw (None: the head's recipe)
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9  # sgd only
    warmup_epochs: float | None = None  # linear warm-up from 0, then the schedule
    schedule: str | None = None  # cosine | constant
    clip_grad: float = 40.0  # max gradient norm (0: off)
    boxes: str = "gt"  # training boxes: gt | proposals (above min_score, labelled by IoU >= 0.5 with GT)
    min_score: float = 0.9  # proposal score threshold for training
    box_jitter: float = 0.075  # each side moved by U(-j, j) x box size, per epoch, on the cached map
    loss: str = "bce"  # bce | pose_softmax (ACAR-Net: softmax over the pose classes + sigmoid)
    pose_ids: tuple[int, ...] | None = None  # the pose classes of pose_softmax (None: ids <= 14, AVA's)
    seed: int = 0

    def recipe_value(self, name: str, recipe: Mapping[str, Any] | None) -> Any:
        value = getattr(self, name)
        if value is not None:
            return value
        return (recipe or {}).get(name, FALLBACK_RECIPE[name])

    def to_json(self) -> dict:
        out = asdict(self)
        out["head_kwargs"] = dict(self.head_kwargs)
        out["pose_ids"] = list(self.pose_ids) if self.pose_ids is not None else None
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
    if isinstance(values.get("pose_ids"), list):
        values["pose_ids"] = tuple(values["pose_ids"])
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
    for name in ("epochs", "batch_size"):
        value = getattr(cfg, name)
        _check(s, name, isinstance(value, int) and not isinstance(value, bool) and value > 0,
               "a positive integer", value)
    _check(s, "optimizer", cfg.optimizer in (None, *OPTIMIZERS), f"one of {', '.join(OPTIMIZERS)}", cfg.optimizer)
    _check(s, "schedule", cfg.schedule in (None, *SCHEDULES), f"one of {', '.join(SCHEDULES)}", cfg.schedule)
    for name in ("lr", "weight_decay", "warmup_epochs", "momentum", "clip_grad", "box_jitter", "min_score"):
        value = getattr(cfg, name)
        _check(s, name, value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and value >= 0), "a number >= 0", value)
    _check(s, "lr", cfg.lr is None or cfg.lr > 0, "a positive number", cfg.lr)
    _check(s, "box_jitter", cfg.box_jitter < 0.5, "a fraction of the box size below 0.5", cfg.box_jitter)
    _check(s, "boxes", cfg.boxes in BOX_SOURCES, f"one of {', '.join(BOX_SOURCES)}", cfg.boxes)
    _check(s, "loss", cfg.loss in LOSSES, f"one of {', '.join(LOSSES)}", cfg.loss)
    _check(s, "pose_ids", cfg.pose_ids is None or all(isinstance(i, int) for i in cfg.pose_ids),
           "a list of label ids", cfg.pose_ids)
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


def pose_columns(cfg: DetectConfig, class_ids: tuple[int, ...]) -> list[int]:
    """Columns (in ``class_ids`` order) of the pose classes of ``pose_softmax``."""
    wanted = set(cfg.pose_ids) if cfg.pose_ids is not None else {i for i in class_ids if i <= AVA_POSE_MAX_ID}
    missing = sorted(wanted - set(class_ids))
    if missing:
        raise ConfigError(f"detect.pose_ids: {missing[0]} is not a class of the label map")
    return [c for c, i in enumerate(class_ids) if i in wanted]
