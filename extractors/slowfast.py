"""SlowFast ResNet (R50 / R101, 8x8 and 4x16) with the module names of pySlowFast's ``model_state``.

The model takes the full-rate clip ``[B, C, T, H, W]``; the fast pathway sees all ``T`` frames and the
slow pathway ``T // alpha`` of them, picked as pySlowFast's and pytorchvideo's ``PackPathway`` do
(``linspace(0, T-1, T//alpha).long()``, which is not a plain stride when ``T`` is not ``1 mod alpha``).

Outputs:
- ``forward`` -> ``[B, slow_dim + fast_dim]`` (2304 for R50/R101): each pathway's final map averaged
  over time and space, slow first, as the pySlowFast head concatenates them.
- ``forward_maps`` -> ``(slow [B, 2048, T/alpha, H/32, W/32], fast [B, 256, T, H/32, W/32])``.
- ``forward_map`` -> ``[B, 2304, T/alpha, H/32, W/32]``: the slow map with the fast map average-pooled
  in time to the slow length, concatenated on channels. Its mean over time equals the per-pathway
  temporal average that pySlowFast's AVA RoI head takes before RoIAlign, so keyframe maps are
  ``forward_map(x).mean(2)``. ``res5_dilation=2`` gives the AVA models' stride-16 map.
- ``forward_keyframe`` -> ``(map [B, 2304, H/s, W/s], context [B, 2304, T])``: the keyframe record, the
  map averaged over time per pathway (slow then fast, as the AVA RoI heads concatenate them) and the
  context tokens of CycleACR: the slow map nearest-interpolated to the fast length (as mmaction2's
  RoI extractor does), concatenated with the fast map, max-pooled over space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoints import KeyFormat, load_weights
from extractors.weights import needed_file
from pipeline.errors import ConfigError

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# Temporal kernel of each stage's first conv (stem, res2..res5) per pathway, as published:
# the slow pathway is purely spatial until res4.
SLOW_TEMPORAL = (1, 1, 1, 3, 3)
FAST_TEMPORAL = (5, 3, 3, 3, 3)

# (depth, alpha, fusion kernel) of the released Kinetics models: R50 8x8 fuses with 7x1x1 kernels,
# R50 4x16 (alpha 8) and R101 8x8 (pySlowFast c2 config and the pytorchvideo hub alike) with 5x1x1.
ARCHS = {
    "r50_8x8": dict(depth=50, alpha=4, fusion_kernel=7),
    "r50_4x16": dict(depth=50, alpha=8, fusion_kernel=5),
    "r101_8x8": dict(depth=101, alpha=4, fusion_kernel=5),
    "r101_4x16": dict(depth=101, alpha=8, fusion_kernel=5),
}

@dataclass(frozen=True)
class SlowFastConfig:
    depth: int = 50
    alpha: int = 4
    beta_inv: int = 8
    fusion_kernel: int = 7
    fusion_ratio: int = 2
    width: int = 64
    stage_blocks: tuple[int, int, int, int] | None = None
    in_channels: int = 3
    res5_dilation: int = 1

    def __post_init__(self):
        blocks = self.stage_blocks or STAGE_BLOCKS.get(self.depth)
        if blocks is None or len(blocks) != 4 or min(blocks) < 1:
            raise ConfigError(f"slowfast: depth must be one of {sorted(STAGE_BLOCKS)} or stage_blocks "
                              f"four positive ints, got depth={self.depth} stage_blocks={self.stage_blocks}")
        object.__setattr__(self, "stage_blocks", tuple(blocks))
        if self.width % self.beta_inv or self.alpha < 1 or self.fusion_kernel % 2 == 0:
            raise ConfigError(f"slowfast: need width divisible by beta_inv, alpha >= 1 and an odd fusion "
                              f"kernel, got width={self.width} beta_inv={self.beta_inv} "
                              f"alpha={self.alpha} fusion_kernel={self.fusion_kernel}")
        if self.res5_dilation not in (1, 2):
            raise ConfigError(f"slowfast: res5_dilation must be 1 or 2, got {self.res5_dilation}")

    @property
    def slow_dim(self) -> int:
        return self.width * 32

    @property
    def fast_dim(self) -> int:
        return self.width * 32 // self.beta_inv


def _conv(c_in, c_out, kernel, stride=(1, 1, 1), dilation=(1, 1, 1)):
    padding = tuple(d * (k // 2) for k, d in zip(kernel, dilation))
    return nn.Conv3d(c_in, c_out, kernel, stride, padding, dilation, bias=False)


class Stem(nn.Module):
    def __init__(self, c_in, c_out, t_kernel):
        super().__init__()
        self.conv = _conv(c_in, c_out, (t_kernel, 7, 7), (1, 2, 2))
        self.bn = nn.BatchNorm3d(c_out)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)), inplace=True)
        return F.max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))


class Bottleneck(nn.Module):
    """ResNet bottleneck; the temporal kernel sits in ``a`` and the spatial stride in ``b``."""

    def __init__(self, c_in, c_out, c_inner, t_kernel, stride, dilation):
        super().__init__()
        if c_in != c_out or stride != 1:
            self.branch1 = _conv(c_in, c_out, (1, 1, 1), (1, stride, stride))
            self.branch1_bn = nn.BatchNorm3d(c_out)
        else:
            self.branch1 = None
        self.branch2 = nn.Module()
        self.branch2.a = _conv(c_in, c_inner, (t_kernel, 1, 1))
        self.branch2.a_bn = nn.BatchNorm3d(c_inner)
        self.branch2.b = _conv(c_inner, c_inner, (1, 3, 3), (1, stride, stride), (1, dilation, dilation))
        self.branch2.b_bn = nn.BatchNorm3d(c_inner)
        self.branch2.c = _conv(c_inner, c_out, (1, 1, 1))
        self.branch2.c_bn = nn.BatchNorm3d(c_out)

    def forward(self, x):
        b = self.branch2
        y = F.relu(b.a_bn(b.a(x)), inplace=True)
        y = F.relu(b.b_bn(b.b(y)), inplace=True)
        y = b.c_bn(b.c(y))
        shortcut = x if self.branch1 is None else self.branch1_bn(self.branch1(x))
        return F.relu(shortcut + y, inplace=True)


class FuseFastToSlow(nn.Module):
    """Time-strided conv from the fast pathway, concatenated onto the slow pathway's channels."""

    def __init__(self, c_fast, ratio, kernel, alpha):
        super().__init__()
        self.conv_f2s = nn.Conv3d(c_fast, c_fast * ratio, (kernel, 1, 1), (alpha, 1, 1),
                                  (kernel // 2, 0, 0), bias=False)
        self.bn = nn.BatchNorm3d(c_fast * ratio)

    def forward(self, slow, fast):
        lateral = F.relu(self.bn(self.conv_f2s(fast)), inplace=True)
        return torch.cat([slow, lateral], 1), fast


class PathwayStage(nn.Module):
    """The blocks of one stage for both pathways, named as pySlowFast names them."""

    def __init__(self, pathways: list[dict[str, nn.Module]]):
        super().__init__()
        self.names = [list(blocks) for blocks in pathways]
        for blocks in pathways:
            for name, block in blocks.items():
                self.add_module(name, block)

    def forward(self, slow, fast):
        outs = []
        for names, x in zip(self.names, (slow, fast)):
            for name in names:
                x = getattr(self, name)(x)
            outs.append(x)
        return outs


class SlowFast(nn.Module):
    def __init__(self, cfg: SlowFastConfig):
        super().__init__()
        self.cfg = cfg
        self.in_channels = cfg.in_channels
        self.feature_dim = cfg.slow_dim + cfg.fast_dim
        w, fast_w = cfg.width, cfg.width // cfg.beta_inv
        self.s1 = PathwayStage([{"pathway0_stem": Stem(cfg.in_channels, w, SLOW_TEMPORAL[0])},
                                {"pathway1_stem": Stem(cfg.in_channels, fast_w, FAST_TEMPORAL[0])}])
        self.s1_fuse = FuseFastToSlow(fast_w, cfg.fusion_ratio, cfg.fusion_kernel, cfg.alpha)
        slow_in, fast_in = w + fast_w * cfg.fusion_ratio, fast_w
        for stage, n_blocks in enumerate(cfg.stage_blocks):
            inner, out = w * 2 ** stage, w * 4 * 2 ** stage
            last = stage == 3
            stride = 1 if stage == 0 or (last and cfg.res5_dilation == 2) else 2
            dilation = cfg.res5_dilation if last else 1
            paths = [
                {f"pathway{p}_res{i}": Bottleneck(c_in if i == 0 else c_out, c_out, c_inner, t_k,
                                                  stride if i == 0 else 1, dilation)
                 for i in range(n_blocks)}
                for p, (c_in, c_out, c_inner, t_k) in enumerate((
                    (slow_in, out, inner, SLOW_TEMPORAL[stage + 1]),
                    (fast_in, out // cfg.beta_inv, inner // cfg.beta_inv, FAST_TEMPORAL[stage + 1])))]
            setattr(self, f"s{stage + 2}", PathwayStage(paths))
            fast_out = out // cfg.beta_inv
            if not last:
                setattr(self, f"s{stage + 2}_fuse",
                        FuseFastToSlow(fast_out, cfg.fusion_ratio, cfg.fusion_kernel, cfg.alpha))
            slow_in, fast_in = out + fast_out * cfg.fusion_ratio, fast_out

    def init_weights(self) -> None:
        # Eval-mode BN with unit running stats does not renormalise, so He (fan-in) init keeps the
        # activation scale of a randomly initialised (tiny / demo) model stable through the stages.
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                m.reset_parameters()

    def pathways(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slow input, fast input) from a full-rate clip, as pySlowFast's PackPathway picks frames."""
        t = clips.shape[2]
        a = self.cfg.alpha
        if t % a or t < a:
            raise ConfigError(f"slowfast: clip length {t} must be a positive multiple of alpha={a}")
        index = torch.linspace(0, t - 1, t // a, device=clips.device).long()
        return clips.index_select(2, index), clips

    def forward_maps(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slow, fast = self.pathways(clips)
        slow, fast = self.s1(slow, fast)
        slow, fast = self.s1_fuse(slow, fast)
        for stage in range(2, 6):
            slow, fast = getattr(self, f"s{stage}")(slow, fast)
            if stage < 5:
                slow, fast = getattr(self, f"s{stage}_fuse")(slow, fast)
        return slow, fast

    def forward_map(self, clips: torch.Tensor) -> torch.Tensor:
        slow, fast = self.forward_maps(clips)
        fast = F.adaptive_avg_pool3d(fast, slow.shape[2:])
        return torch.cat([slow, fast], 1).float()

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        slow, fast = self.forward_maps(clips)
        return torch.cat([slow.mean((2, 3, 4)), fast.mean((2, 3, 4))], 1).float()

    @property
    def feature_stride(self) -> int:
        """Input pixels per map cell: 32, or 16 with res5's spatial stride removed (``res5_dilation=2``)."""
        return 32 // self.cfg.res5_dilation

    def forward_keyframe(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slow, fast = self.forward_maps(clips)
        fmap = torch.cat([slow.mean(2), fast.mean(2)], 1)
        # Nearest interpolation repeats whole frames, so it commutes with the spatial max.
        slow_tokens = F.interpolate(slow.amax((3, 4)), size=fast.shape[2], mode="nearest")
        context = torch.cat([slow_tokens, fast.amax((3, 4))], 1)
        return fmap.float(), context.float()


def _pytorchvideo_rules() -> tuple[tuple[str, str], ...]:
    """pytorchvideo's hub SlowFast -> pySlowFast names. Its ``blocks.0`` is the stem pair, ``blocks.1-4``
    the res stages (``sN`` = ``blocks.N-1``), fusions follow blocks 0-3, ``blocks.6`` is the head."""
    rules = [(r"^blocks\.0\.multipathway_blocks\.(\d)\.conv\.", r"s1.pathway\1_stem.conv."),
             (r"^blocks\.0\.multipathway_blocks\.(\d)\.norm\.", r"s1.pathway\1_stem.bn.")]
    for n in range(4):
        rules += [(rf"^blocks\.{n}\.multipathway_fusion\.conv_fast_to_slow\.", f"s{n + 1}_fuse.conv_f2s."),
                  (rf"^blocks\.{n}\.multipathway_fusion\.norm\.", f"s{n + 1}_fuse.bn.")]
    for n in range(1, 5):
        res = rf"^blocks\.{n}\.multipathway_blocks\.(\d)\.res_blocks\.(\d+)\."
        new = rf"s{n + 1}.pathway\1_res\2."
        rules += [(res + r"branch1_conv\.", new + "branch1."),
                  (res + r"branch1_norm\.", new + "branch1_bn."),
                  (res + r"branch2\.conv_([abc])\.", new + r"branch2.\3."),
                  (res + r"branch2\.norm_([abc])\.", new + r"branch2.\3_bn.")]
    return tuple(rules)


KEY_FORMATS = (
    KeyFormat("pyslowfast", drop=(r"head\.",)),
    KeyFormat("pytorchvideo", drop=(r"blocks\.6\.",), rename=_pytorchvideo_rules()),
)


def build(*, tiny: bool = False, weights: str | Path | None = None, strict: bool = True, seed: int = 0,
          arch: str = "r50_8x8", **arch_overrides) -> SlowFast:
    """SlowFast by ``arch`` (one of ARCHS), fields of ``SlowFastConfig`` overriding it.

    ``tiny``: width 16 (fast pathway 2 channels) and one block per stage, same code; random init
    seeded by ``seed``. ``weights``: a pySlowFast ``.pyth`` (``model_state``) or pytorchvideo file,
    loaded strictly (classification heads ignored); ``model.weight_reports`` lists what was loaded.
    """
    if arch not in ARCHS:
        raise ConfigError(f"slowfast: unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    fields = dict(ARCHS[arch])
    if tiny:
        fields.update(width=16, stage_blocks=(1, 1, 1, 1))
    unknown = set(arch_overrides) - set(SlowFastConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"slowfast: unknown parameter(s) {', '.join(sorted(unknown))}")
    fields.update(arch_overrides)
    if "stage_blocks" in fields and fields["stage_blocks"] is not None:
        fields["stage_blocks"] = tuple(fields["stage_blocks"])
    cfg = SlowFastConfig(**fields)
    with torch.device("meta"):  # allocate once, initialise once
        model = SlowFast(cfg)
    model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights()
    model.weight_reports = () if weights is None else (
        load_weights(model, weights, KEY_FORMATS, needed=needed_file("slowfast", arch),
                     target=f"slowfast {arch}", strict=strict),)
    return model.eval()
