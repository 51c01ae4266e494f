"""Extraction presets: everything that decides what a feature means, bound under one name.

Each preset follows a public feature set (see shared/reference/extraction.md §1-2) so that a store
made with it lines up, frame for frame, with the features a localizer config expects. Every field is
written into the store attributes; any field can be overridden from ``extract`` params
(``--set extract.stride=8``), which also changes the stage key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Mapping

from extractors.registry import BACKBONES
from pipeline.errors import ConfigError
from pipeline.schema import Device, Len, Range, check_instance

TAILS = ("drop", "pad")
STREAMS = ("rgb", "flow", "both")
FLOW_ESTIMATORS = ("raft", "tvl1")
RAFT_ARCHS = ("large", "small", "tiny")
RESIZE_MODES = ("short_side", "squash")
CHANNEL_ORDERS = ("RGB", "BGR")
DECODERS = ("decord", "pyav")  # the order they are tried in by default

Backbone = Literal[tuple(BACKBONES)]
Fps = Annotated[float, Range(gt=0, le=1000)]
ClipLen = Annotated[int, Range(ge=1, le=512, why="512 frames of 224x224 are 0.3 GB per clip in float32, "
                                                   "times the batch; public feature sets use 8 to 64")]
FrameInterval = Annotated[int, Range(ge=1, le=64)]
Stride = Annotated[int, Range(ge=1, le=4096)]
Pixels = Annotated[int, Range(ge=1, le=4096)]
Std = Annotated[float, Range(gt=0)]
Offset = Annotated[float, Range(ge=0, le=512 * 64, why="inside the longest clip")]


@dataclass(frozen=True)
class FlowSpec:
    """How the flow stream's optical flow is made (``extractors.flow``); the ``flow`` section of
    ``extract``'s params (``--set extract.flow.iters=20``, null: the preset's).

    - ``estimator``: ``raft`` (on the device) or ``tvl1`` (OpenCV contrib, CPU; what the public I3D
      features used); ``arch`` and ``iters``: the RAFT variant and its update iterations.
    - ``bound``: flow is clipped to [-bound, bound] pixels and scaled to [-1, 1].
    - ``quantize``: round to the 8 bits of the TV-L1 JPEG pipelines before scaling.
    """

    estimator: Literal[FLOW_ESTIMATORS] = "raft"
    arch: Literal[RAFT_ARCHS] = "large"
    iters: Annotated[int, Range(ge=1, le=64, why="each is one GRU update; RAFT's evaluation runs 12 to 32")] = 12
    bound: Annotated[float, Range(gt=0, le=4096, why="pixels")] = 20.0
    quantize: bool = False


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
    backbone: Backbone
    backbone_kwargs: Mapping[str, Any] = field(default_factory=dict)
    fps: Fps | None = None
    clip_len: ClipLen = 16
    frame_interval: FrameInterval = 1
    stride: Stride = 4
    tail: Literal[TAILS] = "drop"
    resize: Literal[RESIZE_MODES] = "short_side"
    size: Annotated[tuple[Pixels, ...], Len(min=1, max=2)] = (256,)
    crop: tuple[Pixels, Pixels] | None = (224, 224)
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[Std, Std, Std] = (1.0, 1.0, 1.0)
    channel_order: Literal[CHANNEL_ORDERS] = "RGB"
    feature_dim: Annotated[int, Range(ge=1)] = 1024
    offset_frames: Offset | None = None
    streams: Literal[STREAMS] = "rgb"
    flow: FlowSpec = field(default_factory=FlowSpec)
    note: str = ""

    def __post_init__(self) -> None:
        where = f"extract preset {self.name!r}"
        check_instance(self, where)
        want = 1 if self.resize == "short_side" else 2
        if len(self.size) != want:
            raise ConfigError(f"{where}: size must be {want} positive integer(s) for resize "
                              f"{self.resize!r}, got {list(self.size)}")
        if self.crop is not None and (min(self.crop) > self.size[0] if self.resize == "short_side"
                                      else self.crop[0] > self.size[0] or self.crop[1] > self.size[1]):
            raise ConfigError(f"{where}: crop {list(self.crop)} does not fit in frames resized to {list(self.size)}")
        if self.value_range[0] >= self.value_range[1]:
            raise ConfigError(f"{where}: value_range must be [low, high], got {self.value_range!r}")
        span = self.clip_len * self.frame_interval
        if self.offset_frames is not None and self.offset_frames > span:
            raise ConfigError(f"{where}: offset_frames {self.offset_frames} lies outside the clip "
                              f"({span} sampled frames)")
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
        from pipeline.timemap import clip_offset  # numpy: not while planning

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

PRESET_NAMES = tuple(PRESETS)
_TUPLE_FIELDS = ("size", "crop", "value_range", "mean", "std")


@dataclass(frozen=True)
class ExtractParams:
    """Params of ``extract`` (stages.yaml ``schema.params``): a preset, any of its fields overridden
    (null: the preset's value; a number for ``size``/``crop``/``mean``/``std`` repeats), the backbone's
    checkpoint and how the features are stored. The stages.yaml defaults list these fields so the stage
    key of the stores made before the schema stays the same."""

    preset: Literal[PRESET_NAMES] = "thumos_i3d"
    backbone: Backbone | None = None
    backbone_kwargs: Mapping[str, Any] | None = None  # merged onto the preset's build kwargs
    fps: Fps | Literal["native"] | None = None
    clip_len: ClipLen | None = None
    frame_interval: FrameInterval | None = None
    stride: Stride | None = None
    tail: Literal[TAILS] | None = None
    resize: Literal[RESIZE_MODES] | None = None
    size: Pixels | Annotated[tuple[Pixels, ...], Len(min=1, max=2)] | None = None
    crop: Pixels | tuple[Pixels, Pixels] | Literal["none"] | None = None
    value_range: tuple[float, float] | None = None
    mean: float | tuple[float, float, float] | None = None
    std: Std | tuple[Std, Std, Std] | None = None
    channel_order: Literal[CHANNEL_ORDERS] | None = None
    offset_frames: Offset | None = None
    streams: Literal[STREAMS] | None = None  # i3d: rgb, flow, or both (rgb then flow features)
    flow: FlowSpec = field(default_factory=FlowSpec)  # a section: its fields are params (null: the preset's)
    weights: str | Mapping[str, str] | tuple[str, ...] | None = None  # checkpoint file(s) of the backbone
    flow_weights: str | None = None  # the RAFT checkpoint; the tiny arch ships its own
    store: Literal["zarr", "hdf5"] = "zarr"
    dtype: Literal["float16", "float32"] = "float16"

    @classmethod
    def check_params(cls, params: Mapping[str, Any], upstream: Mapping[str, Mapping[str, Any]]) -> None:
        preset = resolve_preset(params)  # the preset with the overrides merged in must be a valid preset
        # A RAFT checkpoint that no RAFT loads would only change the key. (The default thumos_i3d needs
        # one it is not given: that is said when extract runs, as for the backbone's checkpoint, since
        # every command plans every stage.)
        if params.get("flow_weights") is not None and (preset.streams == "rgb" or preset.flow.estimator == "tvl1"):
            why = "streams is rgb" if preset.streams == "rgb" else "the estimator is tvl1"
            raise ConfigError(f"extract.flow_weights: no RAFT runs ({why}); drop it, or set extract.streams "
                              f"to flow or both")


@dataclass(frozen=True)
class ExtractRuntime:
    batch_size: Annotated[int, Range(ge=1, le=4096)] = 8    # clips per forward; halves on CUDA out-of-memory
    device: Device = "auto"
    video_timeout_s: Annotated[float, Range(gt=0, le=86400)] = 600  # a silent decoder is killed after this
    decoders: Annotated[tuple[Literal[DECODERS], ...], Len(min=1)] = DECODERS  # tried in order per video
    flow_batch_size: Annotated[int, Range(ge=1, le=4096)] = 8  # frame pairs per optical-flow forward


@dataclass(frozen=True)
class KeyframeParams(ExtractParams):
    """Params of ``extract_keyframes``: those of ``extract`` (one clip centred on each keyframe: stride
    and tail go unused), an AVA preset by default, and the chunk compression of the maps
    (bench/keyframe_bytes.py measures it: none is the default, reads are 40x faster for 1.3x bytes)."""

    preset: Literal[PRESET_NAMES] = "ava_slowfast_r50"
    compression: Literal["none", "zstd", "lz4"] = "none"

    @classmethod
    def check_params(cls, params: Mapping[str, Any], upstream: Mapping[str, Mapping[str, Any]]) -> None:
        # Flow needs consecutive frames along extract's clip grid; a keyframe's clip is sampled alone.
        flow_set = [k for k in ("flow_weights", *FLOW_PARAMS) if params.get(k) is not None]
        if params.get("streams") not in (None, "rgb") or flow_set:
            name = flow_set[0] if flow_set else "streams"
            raise ConfigError(f"extract_keyframes.{name}: keyframe features are RGB only; optical flow is "
                              f"extract's (streams: flow | both)")
        resolve_preset(params, "extract_keyframes")
        if params.get("compression", "none") != "none" and params.get("store", "zarr") != "zarr":
            raise ConfigError("extract_keyframes.compression: only the zarr store compresses")


# Preset fields a user may override (the flow section's own fields, flat, as the schema holds them), and
# the stages' own params
FLOW_PARAMS = tuple(f.name for f in dataclasses.fields(FlowSpec))
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(ExtractParams)
                    if f.name in Preset.__dataclass_fields__ and f.name != "flow") + FLOW_PARAMS
STAGE_PARAMS = tuple(f.name for f in dataclasses.fields(KeyframeParams)
                     if f.name not in OVERRIDABLE and f.name != "flow")


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
    own = base.backbone_kwargs if overrides.get("backbone", base.backbone) == base.backbone else {}
    overrides["backbone_kwargs"] = {**own, **overrides.get("backbone_kwargs", {})}
    flow = {k: overrides.pop(k) for k in FLOW_PARAMS if k in overrides}
    if flow:
        overrides["flow"] = dataclasses.replace(base.flow, **flow)
    return dataclasses.replace(base, **overrides)
