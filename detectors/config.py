"""The configuration of the detect stages: typed frozen dataclasses, the single source of their field
names and defaults (stages.yaml lists the same names with ``null`` = the default here), validated once.

The optimiser fields left ``None`` take the head's published recipe (``head.recipe``, scaled to the
batch size by the linear rule), so ``--set detect.head=acar`` brings ACAR-Net's optimiser and schedule and
``--set detect.lr=...`` still overrides one field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any, Callable, Literal, Mapping

from pipeline.errors import ConfigError
from pipeline.schema import Device, Range, SplitName, Threads, build

# The names of the detectors.heads registry (kept here so that planning validates a head name without
# importing torch; tests/test_detect_data.py holds the two equal).
HEAD_NAMES = ("roi_linear", "acrn", "acar", "cycleacr")
BOX_SOURCES = ("gt", "proposals")
# DetectConfig field -> Recipe field it overrides
RECIPE_FIELDS = {"optimizer": "optimizer", "lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum",
                 "warmup_epochs": "warmup_epochs", "schedule": "schedule", "epochs": "epochs",
                 "clip_grad": "grad_clip"}
NonNegative = Annotated[float, Range(ge=0)]
Score = Annotated[float, Range(ge=0, le=1)]


@dataclass(frozen=True)
class DetectConfig:
    """``detect`` (training) params (stages.yaml ``schema.params``)."""

    head: Literal[HEAD_NAMES] = "roi_linear"
    head_kwargs: Mapping[str, Any] = field(default_factory=dict)  # passed to the head's constructor
    batch_size: Annotated[int, Range(ge=1, le=4096)] = 8  # clips (keyframes) per step, each with all its actors
    epochs: Annotated[float, Range(gt=0, le=1000)] | None = None  # None: the recipe's (rounded to whole epochs)
    optimizer: Literal["sgd", "adamw"] | None = None
    lr: Annotated[float, Range(gt=0, le=10)] | None = None  # at batch_size clips (None: the recipe's, scaled)
    weight_decay: NonNegative | None = None
    momentum: Annotated[float, Range(ge=0, lt=1)] | None = None
    warmup_epochs: NonNegative | None = None
    schedule: Literal["steps", "cosine"] | None = None
    clip_grad: NonNegative | None = None  # max gradient norm (0: off)
    loss: Literal["bce", "pose_softmax", "focal"] | None = None  # None: the head's
    boxes: Literal[BOX_SOURCES] = "gt"  # training boxes: gt | proposals (above min_score, IoU >= 0.5, + GT)
    min_score: Score = 0.9  # proposal score threshold for training
    box_jitter: Annotated[float, Range(ge=0, lt=0.5)] = 0.075  # each side moved by U(-j, j) x box size
    seed: Annotated[int, Range(ge=0)] = 0
    # CycleACR's long-term memory: the actor features of the keyframes within the head's memory_length
    # (published: +-30 s), from a bank the head fills from the cache once per epoch (at evaluation, from
    # the trained head over the evaluated keyframes) instead of recomputing neighbours at every step
    memory: bool = False
    # a released head file (mmaction2 ACRN, ACAR-Net, CycleACR) loaded strictly instead of training: the
    # stage keeps it as its model, so detect_eval scores the published head on the cached maps
    weights: str | None = None

    @classmethod
    def check_params(cls, params: Mapping[str, Any], upstream: Mapping[str, Mapping[str, Any]]) -> None:
        detect_config(params)  # head_kwargs are checked against the head's arguments when it is built

    @classmethod
    def check_inputs(cls, params: Mapping[str, Any], outputs: Callable[[], Mapping[str, Any]]) -> None:
        """Released ``weights`` against the keyframe store's channels when the store is built: before
        any work (else ``detect`` checks it before loading anything)."""
        if params.get("weights") is not None:
            from detectors.stage import check_store

            check_store(params, outputs())

    def recipe(self, published, batch_clips: int):
        """The head's published ``Recipe`` scaled to ``batch_clips``, with this config's overrides.

        Two published settings only make sense with the rest of their recipe:
        - the per-parameter lr factors (CycleACR: module x10, biases x2) were tuned for the published
          optimiser; under another one ``lr`` is every parameter's lr (AdamW's steps do not shrink with
          the gradient, so x10 / x20 at the demo's lr 0.003 made CycleACR's loss diverge);
        - step milestones are placed within the published length; a new ``epochs`` moves them in
          proportion (ACAR-Net's steps at 5.6 / 6 epochs stay at 93% of a 20-epoch run instead of
          leaving 14 of its 20 epochs at lr x0.01); so does rounding the length to whole epochs."""
        recipe = published.scaled(batch_clips)
        overrides = {r: getattr(self, f) for f, r in RECIPE_FIELDS.items() if getattr(self, f) is not None}
        if self.optimizer is not None and self.optimizer != recipe.optimizer:
            overrides["lr_factors"] = ()
        # training runs whole epochs: the schedule (cosine end, milestones) is fitted to the rounded length
        epochs = max(1, round(self.epochs if self.epochs is not None else recipe.epochs))
        overrides["epochs"] = epochs
        overrides["milestones"] = tuple(m * epochs / recipe.epochs for m in recipe.milestones)
        return replace(recipe, **overrides)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DetectEvalConfig:
    """``detect_eval`` params."""

    split: Annotated[str, SplitName()] = "test"  # a role of the manifest's splits, or a split name
    boxes: Literal[BOX_SOURCES] = "proposals"  # proposals (when the split has them, else gt) | gt
    min_score: Score = 0.85  # proposal score threshold at evaluation (LFB / ACAR-Net val: 0.85)
    protocol: Literal["official", "mmaction2"] = "official"

    @classmethod
    def check_params(cls, params: Mapping[str, Any], upstream: Mapping[str, Mapping[str, Any]]) -> None:
        eval_config(params)


@dataclass(frozen=True)
class DetectRuntime:
    """Runtime values of ``detect`` and ``detect_eval``: how they run, never what they make."""

    device: Device = "auto"
    threads: Threads | None = None  # torch intra-op threads (null: the free CPUs, from the load average and /proc/stat)


def detect_config(params: Mapping[str, Any]) -> DetectConfig:
    """The ``detect`` params (None: the default) as a validated DetectConfig (also a saved run's
    ``config.json``)."""
    cfg = build(DetectConfig, params, "detect")
    if cfg.memory and cfg.head != "cycleacr":
        raise ConfigError(f"detect.memory: only cycleacr has a long-term memory (head is {cfg.head})")
    return cfg


def eval_config(params: Mapping[str, Any]) -> DetectEvalConfig:
    return build(DetectEvalConfig, params, "detect_eval")
