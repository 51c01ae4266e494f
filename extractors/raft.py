"""RAFT optical flow (Teed & Deng, ECCV 2020) in plain PyTorch.

Feature and context encoders at 1/8 resolution, an all-pairs correlation volume pooled into a
pyramid, a recurrent (GRU) update operator that looks the pyramid up around the current estimate,
and convex upsampling of the 1/8 flow to full resolution.

Module names follow princeton-vl/RAFT, so ``raft-things.pth`` / ``raft-sintel.pth`` / ``raft-small.pth``
(saved from ``nn.DataParallel``: every key carries ``module.``) load as they are; torchvision's
``raft_large`` weights load through a key map. One difference in naming: the reference registers
the normalisation of a strided residual block twice (``norm3`` and ``downsample.1``, one module);
here it lives in ``downsample`` only and the alias is set aside when loading.

Architectures (``ARCHS``): ``large`` (RAFT, 5.3 M parameters), ``small`` (RAFT-S, 1.0 M) and ``tiny``
(RAFT-S shape, narrower; trained weights ship in ``extractors/assets/raft_tiny.pt`` for tests and the
demo, see ``tools/train_raft_tiny.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoints import KeyFormat, LoadReport, load_weights
from extractors.weights import needed_file
from pipeline.errors import ConfigError

TINY_WEIGHTS = Path(__file__).parent / "assets" / "raft_tiny.pt"


@dataclass(frozen=True)
class RaftArch:
    """Layer widths of one RAFT variant (the names of princeton-vl/RAFT in comments)."""

    block: str                            # encoder blocks: residual (BasicEncoder) | bottleneck (SmallEncoder)
    widths: tuple[int, int, int, int]     # stem, layer1, layer2, layer3
    feature_dim: int                      # fnet output
    context_norm: str                     # cnet normalisation: batch | none
    hidden_dim: int
    context_dim: int
    corr_levels: int
    corr_radius: int
    corr_convs: tuple[int, ...]           # motion encoder convc1 (1x1), convc2 (3x3)
    flow_convs: tuple[int, int]           # convf1 (7x7), convf2 (3x3)
    motion_dim: int                       # motion features incl. the 2 flow channels
    gru: str                              # sep (SepConvGRU, 1x5 then 5x1) | conv (ConvGRU, 3x3)
    head_dim: int                         # flow_head hidden width
    convex: bool                          # learned convex upsampling (mask head) or bilinear


ARCHS = {
    "large": RaftArch("residual", (64, 64, 96, 128), 256, "batch", 128, 128, 4, 4, (256, 192), (128, 64), 128,
                      "sep", 256, True),
    "small": RaftArch("bottleneck", (32, 32, 64, 96), 128, "none", 96, 64, 4, 3, (96,), (64, 32), 82,
                      "conv", 128, False),
    "tiny": RaftArch("bottleneck", (16, 16, 24, 32), 32, "none", 32, 16, 3, 3, (32,), (16, 8), 24,
                     "conv", 32, False),
}

# torchvision.models.optical_flow.raft_large -> princeton-vl names (applied in order).
_TORCHVISION_RENAME = (
    (r"^feature_encoder\.", "fnet."),
    (r"^context_encoder\.", "cnet."),
    (r"^(fnet|cnet)\.convnormrelu\.0\.", r"\1.conv1."),
    (r"^(fnet|cnet)\.convnormrelu\.1\.", r"\1.norm1."),
    (r"^(fnet|cnet)\.conv\.", r"\1.conv2."),
    (r"\.convnormrelu(\d)\.0\.", r".conv\1."),
    (r"\.convnormrelu(\d)\.1\.", r".norm\1."),
    (r"^update_block\.motion_encoder\.convcorr(\d)\.0\.", r"update_block.encoder.convc\1."),
    (r"^update_block\.motion_encoder\.convflow(\d)\.0\.", r"update_block.encoder.convf\1."),
    (r"^update_block\.motion_encoder\.conv\.0\.", "update_block.encoder.conv."),
    (r"^update_block\.recurrent_block\.convgru(\d)\.conv([zrq])\.", r"update_block.gru.conv\2\1."),
    (r"^mask_predictor\.convrelu\.0\.", "update_block.mask.0."),
    (r"^mask_predictor\.conv\.", "update_block.mask.2."),
)
FORMATS = (
    # norm3 / norm4 of a strided block is the same module as its downsample.1 in the reference.
    KeyFormat("princeton-vl/RAFT", drop=(r"(fnet|cnet)\.layer\d\.0\.norm[34]\.",)),
    KeyFormat("torchvision raft_large", rename=_TORCHVISION_RENAME),
)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels)
    return nn.Identity()


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm1, self.norm2 = _norm(norm, cout), _norm(norm, cout)
        self.downsample = None if stride == 1 else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride),
                                                                 _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        return F.relu((x if self.downsample is None else self.downsample(x)) + y)


class BottleneckBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, stride: int):
        super().__init__()
        mid = cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1)
        self.conv3 = nn.Conv2d(mid, cout, 1)
        self.norm1, self.norm2, self.norm3 = _norm(norm, mid), _norm(norm, mid), _norm(norm, cout)
        self.downsample = None if stride == 1 else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride),
                                                                 _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = F.relu(self.norm3(self.conv3(y)))
        return F.relu((x if self.downsample is None else self.downsample(x)) + y)


class Encoder(nn.Module):
    """Image -> features at 1/8 resolution: 7x7 stride-2 stem, three stages of two blocks (strides 1, 2, 2)."""

    def __init__(self, arch: RaftArch, out_dim: int, norm: str):
        super().__init__()
        block = ResidualBlock if arch.block == "residual" else BottleneckBlock
        stem, *stages = arch.widths
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3)
        self.norm1 = _norm(norm, stem)
        cin = stem
        for i, (width, stride) in enumerate(zip(stages, (1, 2, 2)), start=1):
            self.add_module(f"layer{i}", nn.Sequential(block(cin, width, norm, stride), block(width, width, norm, 1)))
            cin = width
        self.conv2 = nn.Conv2d(cin, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


class MotionEncoder(nn.Module):
    def __init__(self, arch: RaftArch):
        super().__init__()
        cin = arch.corr_levels * (2 * arch.corr_radius + 1) ** 2
        for i, width in enumerate(arch.corr_convs, start=1):
            self.add_module(f"convc{i}", nn.Conv2d(cin, width, 1 if i == 1 else 3, padding=0 if i == 1 else 1))
            cin = width
        self.n_corr = len(arch.corr_convs)
        f1, f2 = arch.flow_convs
        self.convf1 = nn.Conv2d(2, f1, 7, padding=3)
        self.convf2 = nn.Conv2d(f1, f2, 3, padding=1)
        self.conv = nn.Conv2d(cin + f2, arch.motion_dim - 2, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.n_corr + 1):
            corr = F.relu(getattr(self, f"convc{i}")(corr))
        flo = F.relu(self.convf2(F.relu(self.convf1(flow))))
        return torch.cat([F.relu(self.conv(torch.cat([corr, flo], 1))), flow], 1)


def _gru_step(convz, convr, convq, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    hx = torch.cat([h, x], 1)
    z, r = torch.sigmoid(convz(hx)), torch.sigmoid(convr(hx))
    q = torch.tanh(convq(torch.cat([r * h, x], 1)))
    return (1 - z) * h + z * q


class ConvGRU(nn.Module):
    def __init__(self, hidden: int, cin: int):
        super().__init__()
        self.convz, self.convr, self.convq = (nn.Conv2d(hidden + cin, hidden, 3, padding=1) for _ in range(3))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _gru_step(self.convz, self.convr, self.convq, h, x)


class SepConvGRU(nn.Module):
    """A horizontal (1x5) then a vertical (5x1) GRU step: a 5x5 receptive field at a fraction of the cost."""

    def __init__(self, hidden: int, cin: int):
        super().__init__()
        for axis, (kernel, pad) in ((1, ((1, 5), (0, 2))), (2, ((5, 1), (2, 0)))):
            for gate in "zrq":
                self.add_module(f"conv{gate}{axis}", nn.Conv2d(hidden + cin, hidden, kernel, padding=pad))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = _gru_step(self.convz1, self.convr1, self.convq1, h, x)
        return _gru_step(self.convz2, self.convr2, self.convq2, h, x)


class FlowHead(nn.Module):
    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


class UpdateBlock(nn.Module):
    def __init__(self, arch: RaftArch):
        super().__init__()
        self.encoder = MotionEncoder(arch)
        gru = SepConvGRU if arch.gru == "sep" else ConvGRU
        self.gru = gru(arch.hidden_dim, arch.context_dim + arch.motion_dim)
        self.flow_head = FlowHead(arch.hidden_dim, arch.head_dim)
        # 9 convex weights for each of the 8x8 full-resolution pixels of a 1/8 cell.
        self.mask = nn.Sequential(nn.Conv2d(arch.hidden_dim, 256, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(256, 64 * 9, 1)) if arch.convex else None

    def forward(self, net, inp, corr, flow):
        net = self.gru(net, torch.cat([inp, self.encoder(flow, corr)], 1))
        # The reference scales the mask by 0.25 to balance gradients; the trained weights expect it.
        mask = None if self.mask is None else 0.25 * self.mask(net)
        return net, mask, self.flow_head(net)


class CorrPyramid:
    """All-pairs correlation of two feature maps, average-pooled into ``levels`` levels, looked up in a
    (2r+1)^2 window around given coordinates at every level."""

    def __init__(self, fmap1: torch.Tensor, fmap2: torch.Tensor, levels: int, radius: int):
        b, c, h, w = fmap1.shape
        corr = torch.bmm(fmap1.flatten(2).transpose(1, 2), fmap2.flatten(2)) / c ** 0.5
        corr = corr.reshape(b * h * w, 1, h, w)
        self.pyramid = [corr]
        for _ in range(levels - 1):
            corr = F.avg_pool2d(corr, 2, stride=2)
            self.pyramid.append(corr)
        self.radius = radius
        d = torch.linspace(-radius, radius, 2 * radius + 1, device=fmap1.device, dtype=fmap1.dtype)
        # The reference adds the (dy, dx) grid to (x, y) coordinates: the window is symmetric, so this
        # only orders its samples transposed, and the trained motion encoder expects that order.
        self.delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1).view(1, 2 * radius + 1, 2 * radius + 1, 2)

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        b, _, h, w = coords.shape
        centre = coords.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, 2)
        out = []
        for level, corr in enumerate(self.pyramid):
            xy = centre / 2 ** level + self.delta
            hl, wl = corr.shape[-2:]
            grid = torch.stack([2 * xy[..., 0] / max(wl - 1, 1) - 1, 2 * xy[..., 1] / max(hl - 1, 1) - 1], -1)
            sampled = F.grid_sample(corr, grid, align_corners=True)
            out.append(sampled.view(b, h, w, -1))
        return torch.cat(out, -1).permute(0, 3, 1, 2).contiguous()


def _coords_grid(b: int, h: int, w: int, device, dtype) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                            torch.arange(w, device=device, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys]).unsqueeze(0).expand(b, -1, -1, -1)


def convex_upsample(flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1/8 flow (B, 2, H, W) -> (B, 2, 8H, 8W): each fine pixel a softmax-weighted mix of its coarse
    3x3 neighbourhood."""
    b, _, h, w = flow.shape
    mask = torch.softmax(mask.view(b, 1, 9, 8, 8, h, w), dim=2)
    patches = F.unfold(8 * flow, 3, padding=1).view(b, 2, 9, 1, 1, h, w)
    return (mask * patches).sum(2).permute(0, 1, 4, 2, 5, 3).reshape(b, 2, 8 * h, 8 * w)


class RAFT(nn.Module):
    """``model(image1, image2)``: RGB images (B, 3, H, W) in [0, 255] -> flow (B, 2, H, W) in pixels,
    channel 0 = x (right), 1 = y (down), from image1 to image2. Any H, W: inputs are padded to a
    multiple of 8 by edge replication (as the reference's InputPadder) and the flow cropped back."""

    def __init__(self, arch: RaftArch | str = "large", iters: int = 12):
        super().__init__()
        self.arch = ARCHS[arch] if isinstance(arch, str) else arch
        a = self.arch
        self.iters = iters
        self.fnet = Encoder(a, a.feature_dim, "instance")
        self.cnet = Encoder(a, a.hidden_dim + a.context_dim, a.context_norm)
        self.update_block = UpdateBlock(a)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, iters: int | None = None) -> torch.Tensor:
        return self.predictions(image1, image2, iters)[-1]

    def consecutive(self, frames: torch.Tensor, iters: int | None = None) -> torch.Tensor:
        """Flow between each frame and the next, (N, 3, H, W) -> (N - 1, 2, H, W): every frame is
        encoded once, not once per pair it belongs to."""
        x, crop = self._prepare(frames)
        fmaps = self.fnet(x).float()
        return self._refine(fmaps[:-1], fmaps[1:], x[:-1], crop, iters)[-1]

    def predictions(self, image1: torch.Tensor, image2: torch.Tensor, iters: int | None = None) -> list[torch.Tensor]:
        """Full-resolution flow after every update (training supervises all of them)."""
        x, crop = self._prepare(torch.cat([image1, image2]))
        fmap1, fmap2 = self.fnet(x).float().chunk(2)
        return self._refine(fmap1, fmap2, x[:len(image1)], crop, iters)

    def _prepare(self, images: torch.Tensor):
        """[0, 255] -> [-1, 1], padded to a multiple of 8 by edge replication (the reference's
        InputPadder); also the slices that crop a padded flow back."""
        h, w = images.shape[-2:]
        smallest = 8 * 2 ** (self.arch.corr_levels - 1)
        if min(h, w) < smallest - 7:
            raise ConfigError(f"raft: {h}x{w} frames are too small for {self.arch.corr_levels} correlation levels "
                              f"(at least {smallest - 7} px a side)")
        ph, pw = -h % 8, -w % 8
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        x = F.pad(2 * (images / 255.0) - 1, pads, mode="replicate") if ph or pw else 2 * (images / 255.0) - 1
        return x, (slice(pads[2], pads[2] + h), slice(pads[0], pads[0] + w))

    def _refine(self, fmap1, fmap2, x1, crop, iters) -> list[torch.Tensor]:
        a = self.arch
        corr = CorrPyramid(fmap1, fmap2, a.corr_levels, a.corr_radius)
        net, inp = self.cnet(x1).split([a.hidden_dim, a.context_dim], 1)
        net, inp = torch.tanh(net), torch.relu(inp)
        b, _, hc, wc = fmap1.shape
        coords0 = _coords_grid(b, hc, wc, fmap1.device, fmap1.dtype)
        coords1 = coords0.clone()
        out = []
        for _ in range(self.iters if iters is None else iters):
            coords1 = coords1.detach()
            net, mask, delta = self.update_block(net, inp, corr(coords1), coords1 - coords0)
            coords1 = coords1 + delta
            flow = coords1 - coords0
            up = (8 * F.interpolate(flow, scale_factor=8, mode="bilinear", align_corners=True) if mask is None
                  else convex_upsample(flow, mask))
            out.append(up[..., crop[0], crop[1]])
        return out


def build(arch: str = "large", *, weights: str | Path | None = None, iters: int = 12, strict: bool = True,
          seed: int = 0) -> RAFT:
    """RAFT in eval mode. ``weights``: a published checkpoint (``extractors.weights``); ``arch='tiny'`` without
    weights loads the trained tiny weights shipped with the project. ``weight_reports`` lists the file read."""
    if arch not in ARCHS:
        raise ConfigError(f"raft.arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ConfigError(f"raft.iters: must be a positive integer, got {iters!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RAFT(arch, iters=iters)
    if weights is None and arch == "tiny":
        weights = TINY_WEIGHTS
    reports: tuple[LoadReport, ...] = ()
    if weights is not None:
        reports = (load_weights(model, weights, FORMATS, needed=needed_file("raft", arch), target=f"raft {arch}",
                                strict=strict),)
    model.weight_reports = reports
    return model.eval()
