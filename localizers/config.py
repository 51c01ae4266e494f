"""ActionFormer configuration: frozen dataclasses, presets, validation of the stage params.

The presets follow the official configs of happyharrycn/actionformer_release (``thumos_i3d.yaml``,
``anet_tsp.yaml`` merged with its defaults); ``demo`` is a small CPU-fast variant for the generated
demo dataset and the tests. ``localize.params`` = ``{preset: NAME, <field>: value, ...}`` where a field is
any field of :class:`ModelConfig`, :class:`TrainConfig`, :class:`DataConfig` or :class:`TestConfig`
(names are unique across the four). Validation happens once, in :func:`resolve`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from pipeline.errors import ConfigError

DEFAULT_RANGES = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10000))


@dataclass(frozen=True)
class ModelConfig:
    input_dim: int | str = "auto"          # "auto": the feature store's feature_dim
    num_classes: int | str = "auto"        # "auto": the number of classes in the annotations
    embed_dim: int = 512                   # embd_dim = fpn_dim = head_dim in the official configs
    backbone_arch: tuple[int, int, int] = (2, 2, 5)  # embedding convs, stem blocks, downsampling blocks
    n_head: int = 4
    window: tuple[int, ...] = (19,) * 6    # local attention window per level; <= 0 means global
    max_seq_len: int = 2304
    regression_ranges: tuple[tuple[int, int], ...] = DEFAULT_RANGES
    head_layers: int = 3
    head_kernel: int = 3
    embed_kernel: int = 3
    abs_pe: bool = False                   # sinusoidal absolute position embedding (ActivityNet)
    drop_path: float = 0.1
    cls_prior_prob: float = 0.01

    @property
    def num_levels(self) -> int:
        return self.backbone_arch[2] + 1

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2 ** i for i in range(self.num_levels))

    @property
    def max_div_factor(self) -> int:
        """Inputs longer than max_seq_len are padded to a multiple of this (as the official model)."""
        return max(s * (w // 2) * 2 if w > 1 else s for s, w in zip(self.strides, self.window))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30                       # cosine epochs, after the warm-up ones
    warmup_epochs: int = 5
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.05
    eta_min: float = 1e-8
    clip_grad: float = 1.0
    ema_decay: float = 0.999
    loss_norm_init: float = 100.0
    loss_norm_momentum: float = 0.9
    center_radius: float = 1.5
    reg_loss: str = "diou"                 # diou | giou
    reg_loss_weight: float = 1.0           # <= 0: balance adaptively, as the official code
    label_smoothing: float = 0.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    seed: int = 1234567891
    precision: str = "auto"                # auto | fp32 | bf16 (auto: bf16 on CUDA and on AMX CPUs)

    @property
    def total_epochs(self) -> int:
        return self.warmup_epochs + self.epochs


@dataclass(frozen=True)
class DataConfig:
    trunc_thresh: float = 0.5              # a training crop keeps >= this fraction of one action
    crop_ratio: tuple[float, float] | None = (0.9, 1.0)  # random crops of short videos too
    resize_to: int | None = None           # ActivityNet: every video linearly resized to this length
    # A training segment outside its video: "error" names it; "drop" leaves it out (the official
    # THUMOS14 JSON has four such segments in its validation videos, which ActionFormer's crops drop too).
    segments_outside: str = "error"


@dataclass(frozen=True)
class TestConfig:
    pre_nms_thresh: float = 0.001
    pre_nms_topk: int = 2000
    nms_method: str = "soft"               # soft | hard | none
    iou_threshold: float = 0.1
    nms_sigma: float = 0.5
    min_score: float = 0.001
    max_detections: int = 200
    duration_thresh: float = 0.05          # on the feature grid
    ext_score_file: str | None = None      # video-level class scores to fuse (ActivityNet)
    ext_score_topk: int = 2


@dataclass(frozen=True)
class LocalizeConfig:
    preset: str
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    test: TestConfig

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping) -> "LocalizeConfig":
        def build(kind, values):
            return kind(**{f.name: as_config_value(values[f.name]) for f in fields(kind) if f.name in values})
        return cls(preset=obj["preset"], model=build(ModelConfig, obj["model"]),
                   train=build(TrainConfig, obj["train"]), data=build(DataConfig, obj["data"]),
                   test=build(TestConfig, obj["test"]))

    def with_dims(self, input_dim: int, num_classes: int) -> "LocalizeConfig":
        """Fill the ``auto`` dimensions; an explicit value that disagrees is a configuration error."""
        dims = {}
        for name, actual, source in (("input_dim", input_dim, "the feature store's feature_dim"),
                                     ("num_classes", num_classes, "the number of annotated classes")):
            set_to = getattr(self.model, name)
            if name == "num_classes" and set_to == 1:  # class-agnostic: every action is one class
                actual = 1
            if set_to != "auto" and int(set_to) != int(actual):
                raise ConfigError(f"localize.{name}: set to {set_to} but {source} is {actual}")
            dims[name] = int(actual)
        return replace(self, model=replace(self.model, **dims))


PRESETS: dict[str, LocalizeConfig] = {
    "thumos_i3d": LocalizeConfig("thumos_i3d", ModelConfig(), TrainConfig(), DataConfig(), TestConfig()),
    "anet_tsp": LocalizeConfig(
        "anet_tsp",
        ModelConfig(embed_dim=256, window=(7, 7, 7, 7, 7, -1), max_seq_len=192, abs_pe=True),
        TrainConfig(epochs=10, warmup_epochs=5, batch_size=16, lr=1e-3, loss_norm_init=200.0,
                    reg_loss_weight=2.0, label_smoothing=0.1),
        DataConfig(resize_to=192),
        TestConfig(max_detections=100, nms_sigma=0.75, duration_thresh=0.001),
    ),
    # short generated videos (~100-300 features): 4 levels, window 9, tiny widths, a few epochs
    "demo": LocalizeConfig(
        "demo",
        ModelConfig(embed_dim=64, backbone_arch=(2, 1, 3), n_head=4, window=(9,) * 4, max_seq_len=256,
                    regression_ranges=((0, 4), (4, 8), (8, 16), (16, 10000)), drop_path=0.0),
        TrainConfig(epochs=12, warmup_epochs=2, batch_size=4, lr=1e-3, ema_decay=0.99, seed=0, precision="fp32"),
        DataConfig(),
        TestConfig(max_detections=100),
    ),
}

_SECTIONS = (("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig), ("test", TestConfig))


def as_config_value(value: Any) -> Any:
    """JSON/YAML gives lists; the frozen configs hold tuples (hashable, comparable)."""
    if isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def resolve(params: Mapping[str, Any]) -> LocalizeConfig:
    """``localize`` stage params -> validated :class:`LocalizeConfig` (ConfigError naming the param)."""
    params = dict(params)
    name = params.pop("preset", "thumos_i3d")
    if name not in PRESETS:
        raise ConfigError(f"localize.preset: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    base = PRESETS[name]
    owners = {f.name: section for section, kind in _SECTIONS for f in fields(kind)}
    updates: dict[str, dict] = {section: {} for section, _ in _SECTIONS}
    for key, value in params.items():
        if value is None:  # a param listed in stages.yaml and left null keeps the preset's value
            continue
        if key not in owners:
            raise ConfigError(f"localize.{key}: unknown parameter")
        updates[owners[key]][key] = as_config_value(value)
    cfg = replace(base, **{s: replace(getattr(base, s), **u) for s, u in updates.items() if u})
    validate(cfg)
    return cfg


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"localize.{param}: {message}")


def validate(cfg: LocalizeConfig) -> None:
    m, t, d, s = cfg.model, cfg.train, cfg.data, cfg.test
    for name in ("input_dim", "num_classes"):
        v = getattr(m, name)
        _check(v == "auto" or (isinstance(v, int) and v > 0), name, f"must be 'auto' or a positive integer, got {v!r}")
    _check(isinstance(m.embed_dim, int) and m.embed_dim > 0 and m.embed_dim % m.n_head == 0, "embed_dim",
           f"must be a positive multiple of n_head={m.n_head}, got {m.embed_dim!r}")
    _check(len(m.backbone_arch) == 3 and all(isinstance(a, int) and a >= 0 for a in m.backbone_arch)
           and m.backbone_arch[0] >= 1, "backbone_arch",
           f"must be 3 non-negative integers (embedding convs >= 1), got {m.backbone_arch!r}")
    _check(len(m.window) == m.num_levels, "window", f"needs one window per level ({m.num_levels}), got {m.window!r}")
    _check(len(m.regression_ranges) == m.num_levels and all(len(r) == 2 and r[0] < r[1] for r in m.regression_ranges),
           "regression_ranges", f"needs one [low, high] per level ({m.num_levels}), got {m.regression_ranges!r}")
    _check(isinstance(m.max_seq_len, int) and m.max_seq_len > 0 and m.max_seq_len % m.strides[-1] == 0,
           "max_seq_len", f"must be a positive multiple of the largest stride {m.strides[-1]}, got {m.max_seq_len!r}")
    _check(m.head_layers >= 1, "head_layers", "must be >= 1")
    _check(m.head_kernel % 2 == 1 and m.embed_kernel % 2 == 1, "head_kernel", "kernels must be odd")
    _check(0 <= m.drop_path < 1, "drop_path", "must be in [0, 1)")
    _check(0 < m.cls_prior_prob < 1, "cls_prior_prob", "must be in (0, 1)")
    _check(t.epochs >= 1 and t.warmup_epochs >= 0, "epochs", "epochs must be >= 1 and warmup_epochs >= 0")
    _check(t.batch_size >= 1, "batch_size", "must be >= 1")
    _check(t.lr > 0, "lr", "must be > 0")
    _check(0 <= t.ema_decay < 1, "ema_decay", "must be in [0, 1)")
    _check(0 <= t.loss_norm_momentum < 1, "loss_norm_momentum", "must be in [0, 1)")
    _check(t.reg_loss in ("diou", "giou"), "reg_loss", f"must be diou or giou, got {t.reg_loss!r}")
    _check(t.precision in ("auto", "fp32", "bf16"), "precision", f"must be auto, fp32 or bf16, got {t.precision!r}")
    _check(0 < d.trunc_thresh <= 1, "trunc_thresh", "must be in (0, 1]")
    _check(d.crop_ratio is None or (len(d.crop_ratio) == 2 and 0 < d.crop_ratio[0] <= d.crop_ratio[1] <= 1),
           "crop_ratio", f"must be null or [low, high] within (0, 1], got {d.crop_ratio!r}")
    _check(d.segments_outside in ("error", "drop"), "segments_outside",
           f"must be 'error' or 'drop', got {d.segments_outside!r}")
    _check(d.resize_to is None or d.resize_to == m.max_seq_len, "resize_to",
           f"must be null or equal to max_seq_len ({m.max_seq_len}), got {d.resize_to!r}")
    _check(s.nms_method in ("soft", "hard", "none"), "nms_method", f"must be soft, hard or none, got {s.nms_method!r}")
    _check(s.max_detections >= 1 and s.pre_nms_topk >= 1, "max_detections", "max_detections and pre_nms_topk must be >= 1")
