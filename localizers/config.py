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
from typing import Annotated, Any, Literal, Mapping

from pipeline.errors import ConfigError
from pipeline.schema import Alias, Device, Len, Range, SplitName, Threads, apply, check_instance, frozen

Positive = Annotated[int, Range(ge=1)]
NonNegative = Annotated[int, Range(ge=0)]
Fraction = Annotated[float, Range(gt=0, le=1)]
DEFAULT_RANGES = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10000))


@dataclass(frozen=True)
class ModelConfig:
    # the model (localizers/models.py): actionformer; tbtformer (a distribution over reg_max + 1 bins per
    # boundary, trained with the distribution focal loss); snapformer (point events: heatmaps)
    model: Literal["actionformer", "tbtformer", "snapformer"] = "actionformer"
    input_dim: Positive | Literal["auto"] = "auto"    # "auto": the feature store's feature_dim
    num_classes: Positive | Literal["auto"] = "auto"  # "auto": the annotated classes; 1: class-agnostic
    # embd_dim = fpn_dim = head_dim in the official configs
    embed_dim: Annotated[int, Range(ge=1, le=8192), Alias(("embd_dim",))] = 512
    # embedding convs, stem blocks, downsampling blocks
    backbone_arch: tuple[Annotated[int, Range(ge=1, le=64)], NonNegative, Annotated[int, Range(ge=0, le=12)]] = (2, 2, 5)
    n_head: Annotated[int, Range(ge=1, le=256)] = 4
    window: tuple[int, ...] = (19,) * 6    # local attention window per level; <= 0 means global
    max_seq_len: Annotated[int, Range(ge=1, le=1 << 20)] = 2304
    # "auto": from the training split's segment lengths (localizers.data.auto_regression_ranges)
    regression_ranges: tuple[tuple[NonNegative, NonNegative], ...] | Literal["auto"] = DEFAULT_RANGES
    head_layers: Annotated[int, Range(ge=1, le=64)] = 3
    head_kernel: Annotated[int, Range(ge=1, le=63)] = 3
    embed_kernel: Annotated[int, Range(ge=1, le=63)] = 3
    abs_pe: bool = False                   # sinusoidal absolute position embedding (ActivityNet)
    drop_path: Annotated[float, Range(ge=0, lt=1)] = 0.1
    cls_prior_prob: Annotated[float, Range(gt=0, lt=1)] = 0.01
    # v1: ActionFormer's blocks; v2: RMSNorm, rotary positions, SwiGLU, grouped-query attention
    backbone: Literal["v1", "v2"] = "v1"
    mlp_ratio: Annotated[int, Range(ge=1, le=16)] = 4     # TBTFormer's scaled backbone: 6 (with n_head 16)
    n_kv_head: Annotated[int, Range(ge=1, le=256)] | None = None  # v2: key/value heads (null: n_head)
    fpn: Literal["identity", "bifpn"] = "identity"         # bifpn: cross-scale top-down + bottom-up fusion
    # tbtformer: bins per boundary, in strides of the point's level (a boundary farther away is clamped)
    reg_max: Annotated[int, Range(ge=1, le=256)] = 16

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
    epochs: Annotated[int, Range(ge=1, le=10000, why="cosine epochs; a longer schedule is a typo")] = 30
    warmup_epochs: Annotated[int, Range(ge=0, le=10000, why="a longer warm-up is a typo")] = 5
    batch_size: Annotated[int, Range(ge=1, le=65536)] = 2
    lr: Annotated[float, Range(gt=0, le=10)] = 1e-4
    weight_decay: Annotated[float, Range(ge=0, le=10)] = 0.05
    eta_min: Annotated[float, Range(ge=0, le=10)] = 1e-8
    clip_grad: Annotated[float, Range(ge=0)] = 1.0  # 0: no clipping
    ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.999
    loss_norm_init: Annotated[float, Range(gt=0)] = 100.0
    loss_norm_momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    center_radius: Annotated[float, Range(gt=0)] = 1.5
    reg_loss: Literal["diou", "giou", "eiou"] = "diou"  # eiou: diou + (length difference / enclosing)^2
    # qfl: quality focal loss (GFL), a positive's class target is the tIoU of its predicted segment
    cls_loss: Literal["focal", "qfl"] = "focal"
    dfl_weight: Annotated[float, Range(ge=0, le=100)] = 0.25  # tbtformer: distribution focal loss weight
    reg_loss_weight: float = 1.0           # <= 0: balance adaptively, as the official code
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0
    focal_alpha: Annotated[float, Range(ge=-1, le=1)] = 0.25  # < 0: no alpha weighting
    focal_gamma: Annotated[float, Range(ge=0, le=10)] = 2.0
    seed: Annotated[int, Range(ge=0, le=2**32 - 1, why="numpy seeds are 32-bit")] = 1234567891
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA and on AMX CPUs
    # snapformer: Gaussian sigma of the heatmap targets in cells of each level; the offsets' L1 weight
    heatmap_sigma: Annotated[float, Range(gt=0, le=100)] = 1.0
    offset_loss_weight: Annotated[float, Range(ge=0, le=100)] = 1.0
    # validation mAP@0.5 of the EMA weights on the dataset's `val` split every this many epochs (0: none)
    val_every: Annotated[int, Range(ge=0, le=10000)] = 0
    early_stop: Annotated[int, Range(ge=0, le=10000)] = 0  # stop after this many validations without gain (0: never)

    @property
    def total_epochs(self) -> int:
        return self.warmup_epochs + self.epochs


@dataclass(frozen=True)
class DataConfig:
    # a training crop keeps >= this fraction of one action
    trunc_thresh: Annotated[float, Range(gt=0, le=1)] = 0.5
    # random crops of short videos too
    crop_ratio: tuple[Fraction, Fraction] | None = (0.9, 1.0)
    resize_to: Positive | None = None      # ActivityNet: every video linearly resized to this length
    # A training segment outside its video: "error" names it; "drop" leaves it out (the official
    # THUMOS14 JSON has four such segments in its validation videos, which ActionFormer's crops drop too).
    segments_outside: Literal["error", "drop"] = "error"


@dataclass(frozen=True)
class TestConfig:
    pre_nms_thresh: Annotated[float, Range(ge=0, le=1)] = 0.001
    pre_nms_topk: Annotated[int, Range(ge=1, le=1 << 20)] = 2000
    # diou: hard NMS on tIoU minus the squared centre distance over the enclosing length
    nms_method: Literal["soft", "hard", "diou", "none"] = "soft"
    iou_threshold: Annotated[float, Range(ge=0, le=1)] = 0.1
    nms_sigma: Annotated[float, Range(gt=0, le=100)] = 0.5
    min_score: Annotated[float, Range(ge=0, le=1)] = 0.001
    max_detections: Annotated[int, Range(ge=1, le=1 << 20)] = 200
    duration_thresh: Annotated[float, Range(ge=0)] = 0.05  # on the feature grid
    max_duration: Annotated[float, Range(gt=0)] | None = None  # longer candidates dropped (feature grid)
    score_temperature: Annotated[float, Range(gt=0, le=100)] = 1.0  # scores = sigmoid(logit / temperature)
    class_nms_sigma: tuple[Annotated[float, Range(gt=0, le=100)], ...] | None = None  # soft-NMS sigma per class
    # per class (one value for all, or one per class): a detection whose centre lies closer than this to
    # a higher-scoring one of its class is dropped (feature grid; 0: no constraint)
    min_gap: Annotated[tuple[Annotated[float, Range(ge=0)], ...], Len(min=1)] = (0.0,)
    ext_score_file: str | None = None      # video-level class scores to fuse (ActivityNet)
    ext_score_topk: Annotated[int, Range(ge=1)] = 2
    # snapformer: a peak is a local maximum over peak_window cells of its level; peaks of one class
    # within peak_radius input steps (one event seen by several levels) are merged into the best
    peak_window: Annotated[int, Range(ge=1, le=63)] = 3
    peak_radius: Annotated[float, Range(ge=0)] = 2.0


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
            return kind(**{f.name: frozen(values[f.name]) for f in fields(kind) if f.name in values})
        return cls(preset=obj["preset"], model=build(ModelConfig, obj["model"]),
                   train=build(TrainConfig, obj["train"]), data=build(DataConfig, obj["data"]),
                   test=build(TestConfig, obj["test"]))

    @classmethod
    def check_params(cls, params: Mapping[str, Any], upstream: Mapping[str, Mapping[str, Any]]) -> None:
        """Planning's check of the ``localize`` params: the preset with them merged in must validate."""
        resolve(params)

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
        resolved = replace(self, model=replace(self.model, **dims))
        _check_variants(resolved)  # the per-class lists against the number of classes
        return resolved


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

def resolve(params: Mapping[str, Any]) -> LocalizeConfig:
    """``localize`` stage params (checked against the :class:`LocalizeConfig` schema by the planner:
    ``preset`` and any section field, flat) -> the validated config."""
    name = params.get("preset") or "thumos_i3d"
    if name not in PRESETS:
        raise ConfigError(f"localize.preset: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    cfg = apply(PRESETS[name], params)
    validate(cfg)
    return cfg


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"localize.{param}: {message}")


def validate(cfg: LocalizeConfig) -> None:
    """Each field against its annotation, then what one field cannot say alone."""
    check_instance(cfg, "localize")
    m, d = cfg.model, cfg.data
    _check(m.embed_dim % m.n_head == 0, "embed_dim", f"must be a multiple of n_head={m.n_head}, got {m.embed_dim!r}")
    _check(m.max_seq_len % m.strides[-1] == 0, "max_seq_len",
           f"must be a multiple of the largest stride {m.strides[-1]}, got {m.max_seq_len!r}")
    _check(len(m.window) == m.num_levels, "window", f"needs one window per level ({m.num_levels}), got {m.window!r}")
    for level, (w, stride) in enumerate(zip(m.window, m.strides)):
        _check(w <= m.max_seq_len // stride, "window", f"{w} at level {level} is longer than that level's "
               f"{m.max_seq_len // stride} steps (max_seq_len {m.max_seq_len} / stride {stride}); <= 0 means global")
    ranges = m.regression_ranges
    if ranges != "auto":  # auto: computed when the training split is known
        _check(len(ranges) == m.num_levels and all(lo < hi for lo, hi in ranges), "regression_ranges",
               f"needs one [low, high] per level ({m.num_levels}), got {ranges!r}")
        # a segment whose centre reaches less than the first low would have no positive point at all
        _check(ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), "regression_ranges",
               f"must cover the levels from 0 without gaps (each low = the previous high), got {ranges!r}")
    _check(m.head_kernel % 2 == 1 and m.embed_kernel % 2 == 1, "head_kernel", "kernels must be odd")
    _check(cfg.test.peak_window % 2 == 1, "peak_window", f"must be odd (a cell and its neighbours on both "
           f"sides), got {cfg.test.peak_window!r}")
    _check(d.crop_ratio is None or d.crop_ratio[0] <= d.crop_ratio[1], "crop_ratio",
           f"must be [low, high] with low <= high, got {d.crop_ratio!r}")
    _check(d.resize_to is None or d.resize_to == m.max_seq_len, "resize_to",
           f"must be null or equal to max_seq_len ({m.max_seq_len}), got {d.resize_to!r}")
    _check_variants(cfg)


def _check_variants(cfg: LocalizeConfig) -> None:
    """The combinations of the family's options (backbone v2, TBTFormer, detection quality) that mean nothing."""
    m, t, test = cfg.model, cfg.train, cfg.test
    if m.n_kv_head is not None:
        _check(m.backbone == "v2", "n_kv_head", f"grouped-query attention is backbone v2's; got backbone {m.backbone!r}")
        _check(m.n_head % m.n_kv_head == 0, "n_kv_head",
               f"n_head={m.n_head} must be a multiple of n_kv_head, got {m.n_kv_head!r}")
    if m.backbone == "v2":
        _check((m.embed_dim // m.n_head) % 2 == 0, "n_head", f"backbone v2 rotates channel pairs: embed_dim / "
               f"n_head must be even, got {m.embed_dim} / {m.n_head}")
        _check(not m.abs_pe, "abs_pe", "backbone v2 has rotary positions; set abs_pe false")
    if m.model == "tbtformer" and m.regression_ranges != "auto":  # auto: checked once drawn
        # a positive's farther boundary lies at most its level's range high away; the coarsest level's
        # open range is clamped (actions up to 2 * reg_max of its strides)
        need = max((hi / s for (_, hi), s in zip(m.regression_ranges[:-1], m.strides)), default=0)
        _check(need <= m.reg_max, "reg_max", f"the bins must reach each level's regression range in strides "
               f"({need:g}), got {m.reg_max}")
    _check(t.cls_loss != "qfl" or t.label_smoothing == 0, "label_smoothing",
           "cls_loss qfl sets soft targets itself (the tIoU); set label_smoothing 0")
    _check(test.class_nms_sigma is None or test.nms_method == "soft", "class_nms_sigma",
           f"is a soft-NMS sigma per class; nms_method is {test.nms_method!r}")
    _check(test.max_duration is None or test.max_duration > test.duration_thresh, "max_duration",
           f"must exceed duration_thresh {test.duration_thresh}, got {test.max_duration!r}")
    k = m.num_classes
    if k != "auto":
        _check(test.class_nms_sigma is None or len(test.class_nms_sigma) == k, "class_nms_sigma",
               f"needs one sigma per class ({k}), got {len(test.class_nms_sigma or ())}")
        _check(len(test.min_gap) in (1, k), "min_gap", f"needs one value or one per class ({k}), got {len(test.min_gap)}")


@dataclass(frozen=True)
class LocalizeRuntime:
    """Runtime values of ``localize`` (stages.yaml ``schema.runtime``): how it runs, never what it makes."""

    device: Device = "auto"
    threads: Threads | None = None      # torch intra-op threads (null: the free CPUs, from the load average and /proc/stat)
    in_memory: bool | Literal["auto"] = "auto"
    nproc: Annotated[int, Range(ge=1, le=1024)] = 1   # data-parallel training processes on this machine


@dataclass(frozen=True)
class EvalParams:
    """Params of ``localize_eval``: what to evaluate, and test settings over the trained preset's."""

    split: Annotated[str, SplitName()] = "test"      # a key of the dataset's splits
    weights: Literal["ema", "model"] = "ema"
    checkpoint: str | None = None                    # a checkpoint file to evaluate instead
    tious: Annotated[tuple[Fraction, ...], Len(min=1)] | None = None  # null: the protocol's
    # point events (snapformer): time tolerances in seconds; null: 1, 2, 5
    tolerances: Annotated[tuple[Annotated[float, Range(gt=0, le=3600)], ...], Len(min=1)] | None = None
    test: TestConfig = TestConfig()

    @classmethod
    def check_params(cls, params: Mapping[str, Any], upstream: Mapping[str, Mapping[str, Any]]) -> None:
        """The test settings set here over the preset of the model they will evaluate (the run's
        ``localize`` params) must validate: a wrong combination stops the run before training."""
        cfg = resolve(upstream["localize"])
        try:
            validate(replace(cfg, test=apply(cfg.test, params)))
        except ConfigError as e:  # named as the user set it
            name, _, why = str(e).removeprefix("localize.").partition(": ")
            if name in params or name in (params.get("test") or {}):
                raise ConfigError(f"localize_eval.{name}: {why}") from None
            raise


@dataclass(frozen=True)
class EvalRuntime:
    device: Device = "auto"
    threads: Threads | None = None
