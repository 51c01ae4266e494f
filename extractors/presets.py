"""Extraction presets: everything that decides what a feature means, bound under one name.

Each preset follows a public feature set (see shared/reference/extraction.md §1-2) so that a store
made with it lines up, frame for frame, with the features a localizer config expects. Every field is
written into the store attributes; any field can be overridden from ``extract`` params
(``--set extract.stride=8``), which also changes the stage key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.errors import ConfigError
from pipeline.timemap import clip_offset

TAILS = ("drop", "pad")
STREAMS = ("rgb", "flow", "both")
FLOW_ESTIMATORS = ("raft", "tvl1")
RAFT_ARCHS = ("large", "small", "tiny")
RESIZE_MODES = ("short_side", "squash")
CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class FlowSpec:
    """How the flow stream's optical flow is made (``extractors.flow``).

    - ``estimator``: ``raft`` (on the device) or ``tvl1`` (OpenCV contrib, CPU; what the public I3D
      features used); ``arch`` and ``iters``: the RAFT variant and its update iterations.
    - ``bound``: flow is clipped to [-bound, bound] pixels and scaled to [-1, 1].
    - ``quantize``: round to the 8 bits of the TV-L1 JPEG pipelines before scaling.
    """

    estimator: str = "raft"
    arch: str = "large"
    iters: int = 12
    bound: float = 20.0
    quantize: bool = False

    def __post_init__(self) -> None:
        if self.estimator not in FLOW_ESTIMATORS:
            raise ConfigError(f"extract.flow.estimator: expected one of {FLOW_ESTIMATORS}, got {self.estimator!r}")
        if self.arch not in RAFT_ARCHS:
            raise ConfigError(f"extract.flow.arch: expected one of {RAFT_ARCHS}, got {self.arch!r}")
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 1:
            raise ConfigError(f"extract.flow.iters: must be a positive integer, got {self.iters!r}")
        if isinstance(self.bound, bool) or not isinstance(self.bound, (int, float)) or self.bound <= 0:
            raise ConfigError(f"extract.flow.bound: must be a positive number, got {self.bound!r}")
        if not isinstance(self.quantize, bool):
            raise ConfigError(f"extract.flow.quantize: must be true or false, got {self.quantize!r}")

    @classmethod
    def merged(cls, base: "FlowSpec", overrides) -> "FlowSpec":
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"extract.flow: must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"extract.flow.{unknown[0]}: unknown parameter; known: "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return dataclasses.replace(base, **overrides)


@dataclass(frozen=True)
class Preset:
    """How one feature set is made.

    - ``fps``: ``None`` keeps the native rate (VFR input is still resampled by timestamp to its mean
      rate, so every feature maps to the right seconds); a number resamples to that rate.
    - ``resize``: ``short_side`` scales the short side to ``size`` keeping the aspect ratio;
      ``squash`` scales to ``size`` = (height, width) exactly. Resizing happens at decode time.
    - ``crop``: centre crop (height, width) after the resize, or ``None``.
    - ``value_range``: what uint8 [0, 255] maps to before ``(x - mean) / std``.
    - ``feature_dim``: the dimension of the published backbone (per stream), for reference; a store
      records the dimension of the backbone actually built (a ``tiny`` one, or another variant in
      ``backbone_kwargs`` with its checkpoint).
    - ``streams``: ``rgb``, ``flow`` or ``both`` (I3D only: rgb then flow features, concatenated);
      ``flow``: how the flow stream's optical flow is made.
    - ``offset_frames``: the centre of feature 0 in sampled frames (``None``: clip span / 2).
    """

    name: str
    backbone: str
    backbone_kwargs: Mapping[str, Any] = field(default_factory=dict)
    fps: float | None = None
    clip_len: int = 16
    frame_interval: int = 1
    stride: int = 4
    tail: str = "drop"
    resize: str = "short_side"
    size: tuple[int, ...] = (256,)
    crop: tuple[int, int] | None = (224, 224)
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "RGB"
    feature_dim: int = 1024
    offset_frames: float | None = None
    streams: str = "rgb"
    flow: FlowSpec = field(default_factory=FlowSpec)
    note: str = ""

    def __post_init__(self) -> None:
        where = f"extract preset {self.name!r}"
        for name in ("clip_len", "frame_interval", "stride", "feature_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
        if self.fps is not None and (not isinstance(self.fps, (int, float)) or self.fps <= 0):
            raise ConfigError(f"{where}: fps must be null (native) or a positive number, got {self.fps!r}")
        if self.tail not in TAILS:
            raise ConfigError(f"{where}: tail must be one of {TAILS}, got {self.tail!r}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"{where}: resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        want = 1 if self.resize == "short_side" else 2
        if len(self.size) != want or not all(isinstance(s, int) and s > 0 for s in self.size):
            raise ConfigError(f"{where}: size must be {want} positive integer(s) for resize "
                              f"{self.resize!r}, got {list(self.size)}")
        if self.crop is not None and (len(self.crop) != 2 or not all(isinstance(c, int) and c > 0
                                                                    for c in self.crop)):
            raise ConfigError(f"{where}: crop must be null or [height, width], got {self.crop!r}")
        if self.crop is not None and (min(self.crop) > self.size[0] if self.resize == "short_side"
                                      else self.crop[0] > self.size[0] or self.crop[1] > self.size[1]):
            raise ConfigError(f"{where}: crop {list(self.crop)} does not fit in frames resized to {list(self.size)}")
        if len(self.value_range) != 2 or self.value_range[0] >= self.value_range[1]:
            raise ConfigError(f"{where}: value_range must be [low, high], got {self.value_range!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"{where}: mean and std need 3 values each, std > 0")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ConfigError(f"{where}: channel_order must be one of {CHANNEL_ORDERS}")
        if self.streams not in STREAMS:
            raise ConfigError(f"extract.streams: expected one of {', '.join(STREAMS)}, got {self.streams!r}")
        if self.streams != "rgb" and self.backbone != "i3d":
            raise ConfigError(f"extract.streams: {self.streams!r} needs the i3d backbone (the only one with a "
                              f"flow stream), got {self.backbone!r}")

    @property
    def fps_policy(self) -> str:
        return "native" if self.fps is None else "resample"

    def attrs(self) -> dict:
        """The store attributes that describe these features (JSON-able)."""
        out = dataclasses.asdict(self)
        out["preset"] = out.pop("name")
        out["backbone_kwargs"] = dict(self.backbone_kwargs)
        out["offset_frames"] = clip_offset(self.clip_len, self.frame_interval, self.offset_frames)
        out["fps_policy"] = self.fps_policy
        return out


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
_KINETICS_STD = (0.22803, 0.22145, 0.216989)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    # ActionFormer/CMCS THUMOS14 I3D: 16-frame clips every 4 native frames, [-1, 1], crop 224 of
    # short side 256, two streams: rgb 1024 | flow 1024 = 2048, flow between consecutive frames at
    # the decoded resolution, clipped to [-20, 20] and scaled to [-1, 1]. The public features used
    # TV-L1 (estimator tvl1); RAFT is the default here because it runs on the device.
    Preset(name="thumos_i3d", backbone="i3d", fps=None, clip_len=16, stride=4, tail="drop",
           resize="short_side", size=(256,), crop=(224, 224), value_range=(-1.0, 1.0),
           feature_dim=1024, offset_frames=8, streams="both"),
    # TSP R(2+1)D-34 on ActivityNet: 15 fps, 16-frame non-overlapping clips, resize to 128x171,
    # Kinetics mean/std on [0, 1], centre crop 112.
    Preset(name="anet_tsp", backbone="r2plus1d_34", fps=15.0, clip_len=16, stride=16, tail="drop",
           resize="squash", size=(128, 171), crop=(112, 112), value_range=(0.0, 1.0),
           mean=_KINETICS_MEAN, std=_KINETICS_STD, feature_dim=512, offset_frames=8),
    # EPIC-Kitchens-100 SlowFast R50 8x8: 30 fps, 32-frame clips every 16 frames, 256x256 input,
    # mean 0.45 / std 0.225.
    Preset(name="epic_slowfast", backbone="slowfast", fps=30.0, clip_len=32, stride=16, tail="drop",
           resize="short_side", size=(256,), crop=(256, 256), value_range=(0.0, 1.0),
           mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225), feature_dim=2304, offset_frames=16),
    # VideoMAEv2-g extract_tad_feature.py on THUMOS: native fps, 16 frames every 4, squash to
    # 224x224, no crop, [0, 1] with no mean/std.
    Preset(name="thumos_videomae_v2", backbone="videomae", backbone_kwargs={"variant": "vit_g"},
           fps=None, clip_len=16, stride=4,
           tail="drop", resize="squash", size=(224, 224), crop=None, value_range=(0.0, 1.0),
           feature_dim=1408, offset_frames=8),
    # The demo: tiny seeded I3D on 64-pixel frames of the generated 12-fps videos (one feature
    # every 1/3 s over 4/3 s clips); fast on CPU.
    Preset(name="demo", backbone="i3d", backbone_kwargs={"tiny": True}, fps=None, clip_len=16,
           stride=4, tail="pad", resize="short_side", size=(64,), crop=(64, 64),
           value_range=(-1.0, 1.0), feature_dim=1024, offset_frames=8, flow=FlowSpec(arch="tiny", iters=6),
           note="tiny random-init I3D for demos and tests; streams=flow|both adds the tiny trained RAFT"),
    # Keyframe presets (extract_keyframes: one clip centred on each keyframe; stride and tail serve only
    # when extract runs them over a clip grid).
    # SlowFast R50 8x8 as the AVA detectors run it (mmaction2, ACAR-Net): 30 fps, 32 frames at interval
    # 2, short side 256 keeping the aspect, no crop, 0.45 / 0.225, res5's spatial stride replaced by
    # dilation 2 (output stride 16): map 2304 x H/16 x W/16, context 2304 x 32.
    Preset(name="ava_slowfast_r50", backbone="slowfast", backbone_kwargs={"arch": "r50_8x8", "res5_dilation": 2},
           fps=30.0, clip_len=32, frame_interval=2, resize="short_side", size=(256,), crop=None,
           value_range=(0.0, 1.0), mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225), feature_dim=2304),
    # VideoMAE ViT-B (variant vit_l for ViT-L) as mmaction2's AVA configs: 30 fps, 16 frames at interval
    # 4, short side 256, ImageNet mean / std; tubelet 2 and patch 16: map C x H/16 x W/16, context C x 8.
    Preset(name="ava_videomae", backbone="videomae", backbone_kwargs={"variant": "vit_b"}, fps=30.0,
           clip_len=16, frame_interval=4, resize="short_side", size=(256,), crop=None,
           value_range=(0.0, 1.0), mean=_IMAGENET_MEAN, std=(0.229, 0.224, 0.225), feature_dim=768),
    # The AVA demo: tiny seeded SlowFast (same code, width 16, one block per stage: 576 channels) at
    # output stride 16 on 128-pixel frames, 16 frames at interval 2; fast on CPU.
    Preset(name="demo_ava", backbone="slowfast", backbone_kwargs={"tiny": True, "res5_dilation": 2}, fps=None,
           clip_len=16, frame_interval=2, resize="short_side", size=(128,), crop=None,
           value_range=(0.0, 1.0), mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225), feature_dim=576,
           note="tiny random-init SlowFast for the AVA demo and tests"),
)}

_TUPLE_FIELDS = ("size", "crop", "value_range", "mean", "std")
# Keys of extract / extract_keyframes params that are not preset fields.
STAGE_PARAMS = ("preset", "weights", "flow_weights", "store", "dtype", "compression")
# Preset fields a user may override; stages.yaml lists each with null = "the preset's value".
OVERRIDABLE = ("backbone", "backbone_kwargs", "fps", "clip_len", "frame_interval", "stride", "tail", "resize",
               "size", "crop", "value_range", "mean", "std", "channel_order", "offset_frames", "streams", "flow")


def resolve_preset(params: Mapping[str, Any], stage: str = "extract") -> Preset:
    """The preset named by ``params['preset']`` with every non-null preset field in ``params`` applied.

    ``fps: native`` asks for the native rate and ``crop: none`` for no crop (null keeps the preset's);
    ``backbone_kwargs`` are merged onto the preset's, unless ``backbone`` names another backbone: the
    preset's kwargs belong to its own backbone (ViT-g's ``variant`` means nothing to I3D).
    """
    name = params.get("preset")
    if name not in PRESETS:
        raise ConfigError(f"{stage}.preset: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    base = PRESETS[name]
    overrides = {k: v for k, v in params.items() if k not in STAGE_PARAMS and v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ConfigError(f"{stage}.{unknown[0]}: unknown parameter; preset fields: {', '.join(OVERRIDABLE)}")
    if overrides.get("fps") == "native":
        overrides["fps"] = None
    if overrides.get("crop") == "none":
        overrides["crop"] = None
    for key in _TUPLE_FIELDS:
        value = overrides.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            single = key == "size" and overrides.get("resize", base.resize) == "short_side"
            overrides[key] = (value,) if single else (value,) * (3 if key in ("mean", "std") else 2)
        elif isinstance(value, list):
            overrides[key] = tuple(value)
    if "backbone_kwargs" in overrides:
        if not isinstance(overrides["backbone_kwargs"], Mapping):
            raise ConfigError(f"{stage}.backbone_kwargs: must be a mapping")
    own = base.backbone_kwargs if overrides.get("backbone", base.backbone) == base.backbone else {}
    overrides["backbone_kwargs"] = {**own, **overrides.get("backbone_kwargs", {})}
    if "flow" in overrides:
        overrides["flow"] = FlowSpec.merged(base.flow, overrides["flow"])
    return dataclasses.replace(base, **overrides)
