"""What every detection head shares: the batch it reads, the per-clip actor layout its relations use,
its loss and score functions, and strict loading of a released file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from detectors import losses
from detectors.recipes import Recipe
from pipeline.checkpoints import KeyFormat, LoadReport, load_weights


PUBLISHED_CHANNELS = 2304  # SlowFast R50's fused map: the input every published head was sized for


def width(published: int, in_channels: int, given: int | None) -> int:
    """A head width left unset: the published one at 2304 input channels, in proportion otherwise (a
    576-channel demo map gets a quarter-size head instead of one 16 times its input)."""
    if given is not None:
        return given
    return max(8, round(published * in_channels / PUBLISHED_CHANNELS))


@dataclass
class ActorMemory:
    """CycleACR's long-term memory for the clips of a batch: the head's own pooled actor features of the
    keyframes around each clip, taken from a bank built beforehand (not recomputed by the head).

    ``features`` (B, S, M, D): S = before + 1 + after seconds, up to M actors per second;
    ``mask`` (B, S, M) True where a slot holds an actor. The centre second (index ``before``) is the
    clip's own keyframe: the head fills it with its current actors, whatever the bank says."""

    features: torch.Tensor
    mask: torch.Tensor
    before: int = 30

    @classmethod
    def gather(cls, bank: Mapping[tuple[str, int], torch.Tensor], keyframes: Sequence[tuple[str, int]],
               length: tuple[int, int] = (30, 30), max_per_sec: int = 5, dim: int = 1024) -> "ActorMemory":
        """Assemble the memory of ``keyframes`` (video, timestamp), one per clip, from ``bank``:
        (video, timestamp) -> (n, dim) features. Seconds absent from the bank stay empty; a second with
        more than ``max_per_sec`` actors keeps its first ones."""
        before, after = length
        seconds = before + 1 + after
        feats = torch.zeros(len(keyframes), seconds, max_per_sec, dim)
        mask = torch.zeros(len(keyframes), seconds, max_per_sec, dtype=torch.bool)
        for b, (video, ts) in enumerate(keyframes):
            for s in range(seconds):
                if s == before:
                    continue
                found = bank.get((video, ts - before + s))
                if found is None or len(found) == 0:
                    continue
                n = min(len(found), max_per_sec)
                feats[b, s, :n] = found[:n].float()
                mask[b, s, :n] = True
        return cls(features=feats, mask=mask, before=before)

    def to(self, device) -> "ActorMemory":
        return ActorMemory(self.features.to(device), self.mask.to(device), self.before)


@dataclass
class HeadInput:
    """One batch of keyframes (clips) and their actors.

    ``maps`` (B, C, H, W): the keyframe feature map, time-averaged (all clips of a batch share H, W);
    ``rois`` (R, 5): ``[clip, x1, y1, x2, y2]`` with the box normalised to [0, 1];
    ``clip_index`` (R,) long: the clip of each actor (equal to ``rois[:, 0]``);
    ``image_size`` (B, 2): (height, width) in pixels of the network input the map was computed on;
    ``feature_stride``: input pixels per map cell;
    ``context`` (B, C, T): spatially max-pooled tokens per time step (CycleACR);
    ``memory``: CycleACR's neighbouring-keyframe actor features."""

    maps: torch.Tensor
    rois: torch.Tensor
    clip_index: torch.Tensor
    image_size: torch.Tensor
    feature_stride: int = 16
    context: torch.Tensor | None = None
    memory: ActorMemory | None = None

    def to(self, device) -> "HeadInput":
        """The same batch on ``device`` (dtypes kept: maps may stay float16 until the head casts them)."""
        return HeadInput(maps=self.maps.to(device), rois=self.rois.to(device),
                         clip_index=self.clip_index.to(device), image_size=self.image_size.to(device),
                         feature_stride=self.feature_stride,
                         context=None if self.context is None else self.context.to(device),
                         memory=None if self.memory is None else self.memory.to(device))

    @property
    def num_clips(self) -> int:
        return self.maps.shape[0]

    def pixel_rois(self) -> torch.Tensor:
        """(R, 5) rois with boxes in input pixels (use ``spatial_scale = 1 / feature_stride``)."""
        size = self.image_size.to(self.rois.dtype)[self.clip_index]  # (R, 2) = (h, w)
        scale = torch.stack([size[:, 1], size[:, 0], size[:, 1], size[:, 0]], dim=1)
        return torch.cat([self.rois[:, :1], self.rois[:, 1:] * scale], dim=1)


@dataclass(frozen=True)
class ClipLayout:
    """Actors of a batch laid out per clip: ``slot`` of each actor inside its clip, ``mask`` (B, S) True
    on the slots that hold an actor. Relations run on (B, S, ...) tensors so that a clip never sees
    another clip's actors; padded slots are excluded with ``mask``."""

    clip: torch.Tensor
    slot: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, clip_index: torch.Tensor, num_clips: int, min_slots: int = 0) -> "ClipLayout":
        counts = torch.bincount(clip_index, minlength=num_clips)
        order = torch.argsort(clip_index, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(clip_index)
        slot[order] = torch.arange(len(clip_index), device=clip_index.device) - starts[clip_index[order]]
        slots = max(int(counts.max().item()) if len(clip_index) else 0, min_slots, 1)
        mask = torch.arange(slots, device=clip_index.device)[None, :] < counts[:, None]
        return cls(clip=clip_index, slot=slot, mask=mask)

    @property
    def num_slots(self) -> int:
        return self.mask.shape[1]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(R, ...) -> (B, S, ...), zeros in padded slots."""
        out = x.new_zeros(self.mask.shape[0], self.num_slots, *x.shape[1:])
        out[self.clip, self.slot] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (R, ...)."""
        return x[self.clip, self.slot]


def masked_softmax(logits: torch.Tensor, key_mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` where keys with ``key_mask`` False get zero weight. A row with no valid key
    (a padded query) gets uniform weights instead of NaN, so it stays finite and is dropped later."""
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, torch.finfo(logits.dtype).min)
    return logits.softmax(dim)


class Head(nn.Module):
    """Base of the detection heads: ``forward(HeadInput) -> logits (R, num_classes)``, ``loss``,
    ``scores`` and strict loading of the published file. Subclasses set ``recipe`` and ``released``."""

    recipe: Recipe
    #: key formats of the published checkpoint (public names -> ours), for ``load_released``
    released: tuple[KeyFormat, ...] = ()
    #: what the published file is and where it comes from, for "file not found" messages
    released_file: str = ""
    #: (our state-dict key, axis, divisor): where a released file shows the map channels it was built for
    released_input: tuple[str, int, int] = ("", 0, 1)

    def __init__(self, loss: str, num_classes: int, num_pose: int = 0,
                 class_groups: tuple[int, ...] = (), loss_weights: tuple[float, ...] = (),
                 focal_gamma: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.objective = losses.build_loss(loss, num_classes=num_classes, num_pose=num_pose,
                                           class_groups=class_groups, loss_weights=loss_weights,
                                           gamma=focal_gamma)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss of ``logits`` (R, K) against multi-hot ``targets`` (R, K)."""
        return self.objective.loss(logits, targets)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-class detection scores in [0, 1] as the published evaluation computes them."""
        return self.objective.scores(logits)

    @classmethod
    def released_channels(cls, state_dict: Mapping[str, torch.Tensor]) -> int | None:
        """The input channels of a released state dict (keys as stored), or None when none of the
        released formats finds the key that shows them (then strict loading names what is wrong)."""
        key, axis, divisor = cls.released_input
        for fmt in cls.released:
            converted, _, _ = fmt.convert(state_dict)
            if key in converted and converted[key].dim() > axis:
                return int(converted[key].shape[axis]) // divisor
        return None

    def load_released(self, path: str | Path, strict: bool = True) -> LoadReport:
        """Load the published head weights from ``path`` (read with ``weights_only=True``): container and
        prefix removed, backbone keys set aside, every head key consumed with its shape, else one error
        naming the offending keys."""
        return load_weights(self, path, self.released, needed=self.released_file,
                            target=type(self).__name__, strict=strict)
