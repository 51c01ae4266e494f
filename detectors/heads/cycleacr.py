"""CycleACR as published (MCG-NJU/CycleACR ``cycleacr.py`` + AlphAction's ``2MLPFeatureExtractor`` and
``FCPredictor``), on cached maps and context tokens.

- RoIAlign 7x7 (legacy, adaptive sampling, stride 16): 49 local tokens; their max is the actor vector.
- Actor, context (T tokens) and local tokens are reduced to ``dim_inner`` (1x1x1 convs + dropout).
- Cycle modelling, ``depth`` blocks per stage: local A2C (context tokens attend to [actor; 49 local]),
  C2A (the actor attends to the reorganised context + a learned temporal position embedding), global A2C
  (the time-mean of the reduced context, taken before local A2C, attends to [enhanced actor; 49 local]);
  concat(actor, global) -> ``roi_dim_reduce``: the pooled actor feature, also what the memory bank holds.
- Instance interaction, ``instance_depth`` layers: attention over the actors of the clip (the actor
  itself included), then over the long-term memory (±30 s, ≤5 actors per second, learned per-second
  position embeddings on keys and values); the last memory block outputs ``in_channels`` with a shortcut.
- ``add`` fusion with the actor vector, fc1 + ReLU, fc2 + ReLU, dropout, linear classifier.

Published quirks, reproduced by default because the released weights were trained with them:
- ``conv_bias=True``: every 1x1x1 conv has a bias (the published ``nn.Conv3d(cin, cout, 1, bias)`` puts
  the flag in the stride slot, so ``NO_BIAS`` never removes it). ``False`` builds them without bias.
- ``mask_padding=False``: person keys are zero-padded to ``max_person`` and the memory to
  ``seconds x max_per_sec`` slots, all taking part in the softmax (a padded key projects to the conv
  bias, plus the position embedding in the memory). Padding is per clip and of fixed size, so a clip's
  prediction never depends on the other clips of its batch. ``True`` masks the padded keys instead.
Every 1x1x1 conv runs as a matrix product over the channel axis (same weights, same shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detectors.heads.base import ClipLayout, Head, HeadInput, masked_softmax, width
from detectors.recipes import Recipe
from detectors.roi_align import roi_align
from pipeline.checkpoints import KeyFormat

# config_files/slowfast_r101_8x8f_cycleacr.yaml: SGD 8e-4 for 32 clips, 50k iterations, warm-up 2000
# iterations from x0.25, x0.1 at 30k and 40k; bias lr x2 and wd 0, position embeddings wd 0, the CycleACR
# module lr x10 (HEAD_LR_FACTOR). Iterations -> epochs over AVA v2.2 train (235 videos x 897 keyframes).
_ITER_EPOCHS = 32 / (235 * 897)
CYCLEACR_R101 = Recipe(optimizer="sgd", lr=8e-4, batch_clips=32, epochs=50_000 * _ITER_EPOCHS,
                       weight_decay=1e-7, schedule="steps",
                       milestones=(30_000 * _ITER_EPOCHS, 40_000 * _ITER_EPOCHS),
                       warmup_epochs=2_000 * _ITER_EPOCHS, warmup_start=0.25,
                       no_decay=(r"bias$", r"position"),
                       lr_factors=((r"bias$", 2.0), (r"^cycleacr_module\.", 10.0)))


class Pointwise(nn.Conv3d):
    """A published 1x1x1 Conv3d applied to channel-last tensors (..., C) as a linear map."""

    def __init__(self, cin: int, cout: int, bias: bool, init_std: float = 0.01):
        super().__init__(cin, cout, 1, bias=bias)
        if init_std:
            nn.init.normal_(self.weight, std=init_std)
        else:
            nn.init.zeros_(self.weight)
        if bias:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)


class InteractionBlock(nn.Module):
    """Attention of queries over keys, LayerNorm (no affine) over each query set, ReLU, zero-initialised
    output conv, dropout, residual (with a shortcut conv when the width changes).

    ``query`` (G, N, T, Dp): G groups of N query sets of T tokens; ``keys`` (G, K, Do) shared by the
    N sets of a group; ``key_mask`` (G, K) or None; ``position`` (K, Di) added to projected keys/values."""

    def __init__(self, dim_person: int, dim_other: int, dim_out: int, dim_inner: int, bias: bool,
                 dropout: float, positions: int = 0):
        super().__init__()
        self.query = Pointwise(dim_person, dim_inner, bias)
        self.key = Pointwise(dim_other, dim_inner, bias)
        self.value = Pointwise(dim_other, dim_inner, bias)
        self.out = Pointwise(dim_inner, dim_out, bias, init_std=0.0)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = Pointwise(dim_person, dim_out, bias) if dim_person != dim_out else None
        if positions:
            self.temporal_position_k = nn.Parameter(torch.zeros(positions, 1, dim_inner, 1, 1, 1))
            self.temporal_position_v = nn.Parameter(torch.zeros(positions, 1, dim_inner, 1, 1, 1))
        self.scale = dim_inner ** -0.5

    def forward(self, query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None,
                ) -> torch.Tensor:
        q, k, v = self.query(query), self.key(keys), self.value(keys)
        if hasattr(self, "temporal_position_k"):
            # keys are (seconds x per-second slots); one embedding per second
            seconds = self.temporal_position_k.shape[0]
            g, n_keys, dim = k.shape
            pk = self.temporal_position_k.view(seconds, 1, dim)
            pv = self.temporal_position_v.view(seconds, 1, dim)
            k = (k.view(g, seconds, n_keys // seconds, dim) + pk).view(g, n_keys, dim)
            v = (v.view(g, seconds, n_keys // seconds, dim) + pv).view(g, n_keys, dim)
        att = torch.einsum("gntd,gkd->gntk", q, k) * self.scale
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = torch.einsum("gntk,gkd->gntd", masked_softmax(att, mask, dim=-1), v)
        out = F.layer_norm(out, out.shape[-2:])
        out = self.dropout(self.out(F.relu(out)))
        return out + (self.shortcut(query) if self.shortcut is not None else query)


def _blocks(n: int, *args, **kw) -> nn.ModuleList:
    return nn.ModuleList(InteractionBlock(*args, **kw) for _ in range(n))


class CycleModeling(nn.Module):
    def __init__(self, dim: int, depth: int, temporal_len: int, bias: bool, dropout: float):
        super().__init__()
        self.local_a2c_blocks = _blocks(depth, dim, dim, dim, dim, bias, dropout)
        self.local_c2a_blocks = _blocks(depth, dim, dim, dim, dim, bias, dropout)
        self.local_temporal_position = nn.Parameter(torch.zeros(temporal_len, dim, 1, 1, 1))
        self.global_a2c_blocks = _blocks(depth, dim, dim, dim, dim, bias, dropout)

    def forward(self, actor: torch.Tensor, context: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """actor (R, D), context (R, T, D), local (R, 49, D) -> (R, 2D)."""
        glob = context.mean(dim=1, keepdim=True)[:, None]                      # (R, 1, 1, D)
        ctx = context[:, None]                                                  # (R, 1, T, D)
        keys = torch.cat([actor[:, None], local], dim=1)                        # (R, 50, D)
        for blk in self.local_a2c_blocks:
            ctx = blk(ctx, keys)
        c2a_keys = ctx[:, 0] + self.local_temporal_position.flatten(1)         # (R, T, D)
        act = actor[:, None, None]                                              # (R, 1, 1, D)
        for blk in self.local_c2a_blocks:
            act = blk(act, c2a_keys)
        keys = torch.cat([act[:, 0], local], dim=1)
        for blk in self.global_a2c_blocks:
            glob = blk(glob, keys)
        return torch.cat([act[:, 0, 0], glob[:, 0, 0]], dim=1)


class InstanceInteraction(nn.Module):
    def __init__(self, dim: int, dim_out: int, depth: int, seconds: int, bias: bool, dropout: float):
        super().__init__()
        self.p_blocks = _blocks(depth, dim, dim, dim, dim, bias, dropout)
        self.m_blocks = nn.ModuleList(
            InteractionBlock(dim, dim, dim_out if i == depth - 1 else dim, dim, bias, dropout, positions=seconds)
            for i in range(depth))

    def forward(self, actors: torch.Tensor, layout: ClipLayout, person_mask: torch.Tensor | None,
                memory: torch.Tensor, memory_mask: torch.Tensor | None) -> torch.Tensor:
        """actors (R, D); memory (B, S*M, D) -> (R, dim_out)."""
        x = actors
        for p_blk, m_blk in zip(self.p_blocks, self.m_blocks):
            padded = layout.pad(x)                                              # (B, S, D)
            x = layout.unpad(p_blk(padded[:, :, None], padded, person_mask))[:, 0]
            x = layout.unpad(m_blk(layout.pad(x)[:, :, None], memory, memory_mask))[:, 0]
        return x


class CycleACRModule(nn.Module):
    def __init__(self, in_channels: int, dim: int, dim_out: int, depth: int, instance_depth: int,
                 temporal_len: int, seconds: int, bias: bool, dropout: float):
        super().__init__()
        self.actor_dim_reduce = Pointwise(in_channels, dim, bias)
        self.context_dim_reduce = Pointwise(in_channels, dim, bias)
        self.local_dim_reduce = Pointwise(in_channels, dim, bias)
        # built without the flag in the published code, so it has a bias in every configuration
        self.roi_dim_reduce = Pointwise(dim * 2, dim, True)
        self.reduce_dropout = nn.Dropout(dropout)
        self.cycle_modeling = CycleModeling(dim, depth, temporal_len, bias, dropout)
        self.instance_interaction = InstanceInteraction(dim, dim_out, instance_depth, seconds, bias, dropout)


class CycleACRHead(Head):
    recipe = CYCLEACR_R101
    released = (KeyFormat("CycleACR", drop=(r"backbone\.",),
                          prefixes=("roi_heads.action.feature_extractor.", "roi_heads.action.predictor.")),)
    released_file = "CycleACR slowfast_r101_8x8f_cycleacr checkpoint (MCG-NJU/CycleACR model zoo)"
    released_input = ("cycleacr_module.actor_dim_reduce.weight", 1, 1)

    def __init__(self, in_channels: int = 2304, num_classes: int = 80, dim_inner: int | None = None,
                 depth: int = 2, instance_depth: int = 2, temporal_len: int = 32, roi_size: int = 7,
                 max_person: int = 20, memory_length: tuple[int, int] = (30, 30), max_per_sec: int = 5,
                 dropout: float = 0.2, mlp_dim: int | None = None, predictor_dropout: float = 0.2,
                 conv_bias: bool = True, mask_padding: bool = False, loss: str = "focal",
                 class_groups: tuple[int, int, int] = (14, 49, 17), loss_weights: tuple[float, ...] = (),
                 focal_gamma: float = 2.0, num_pose: int = 14):
        super().__init__(loss, num_classes, num_pose=num_pose, class_groups=class_groups,
                         loss_weights=loss_weights, focal_gamma=focal_gamma)
        dim_inner, mlp_dim = width(1024, in_channels, dim_inner), width(1024, in_channels, mlp_dim)
        self.roi_size, self.max_person, self.mask_padding = roi_size, max_person, mask_padding
        self.memory_length, self.max_per_sec, self.dim_inner = tuple(memory_length), max_per_sec, dim_inner
        seconds = self.memory_length[0] + 1 + self.memory_length[1]
        self.cycleacr_module = CycleACRModule(in_channels, dim_inner, in_channels, depth, instance_depth,
                                              temporal_len, seconds, conv_bias, dropout)
        self.fc1 = nn.Linear(in_channels, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, mlp_dim)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        self.predictor_dropout = nn.Dropout(predictor_dropout)
        self.cls_score = nn.Linear(mlp_dim, num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.zeros_(self.cls_score.bias)

    def _actor_features(self, batch: HeadInput):
        """(roi vector (R, C), pooled actor feature (R, dim_inner)) before instance interaction."""
        if batch.context is None:
            raise ValueError("cycleacr needs HeadInput.context (B, C, T) context tokens")
        mod = self.cycleacr_module
        dtype = self.fc1.weight.dtype
        local = roi_align(batch.maps.to(dtype), batch.pixel_rois(), self.roi_size,
                          1.0 / batch.feature_stride, 0, False).flatten(2).transpose(1, 2)  # (R, 49, C)
        roi = local.amax(dim=1)
        drop = mod.reduce_dropout
        actor = drop(mod.actor_dim_reduce(roi))
        context = drop(mod.context_dim_reduce(batch.context.to(dtype).transpose(1, 2))[batch.clip_index])
        local = drop(mod.local_dim_reduce(local))
        pooled = mod.roi_dim_reduce(mod.cycle_modeling(actor, context, local))
        return roi, pooled

    def memory_features(self, batch: HeadInput) -> torch.Tensor:
        """(R, dim_inner) detached pooled actor features: what a memory bank stores per keyframe actor."""
        return self._actor_features(batch)[1].detach()

    def _memory(self, batch: HeadInput, layout: ClipLayout, pooled: torch.Tensor):
        """(B, S*M, D) keys and their mask: the bank's neighbouring seconds plus, in the centre second,
        the clip's own actors (detached, first ``max_per_sec`` of them), as the published pool does."""
        before, after = self.memory_length
        seconds, per_sec = before + 1 + after, self.max_per_sec
        clips = batch.num_clips
        mem = batch.memory
        if mem is None:
            feats = pooled.new_zeros(clips, seconds, per_sec, self.dim_inner)
            mask = torch.zeros(clips, seconds, per_sec, dtype=torch.bool, device=pooled.device)
        else:
            if mem.features.shape[1:] != (seconds, per_sec, self.dim_inner) or mem.before != before:
                raise ValueError(f"cycleacr: memory must be (B, {seconds}, {per_sec}, {self.dim_inner}) "
                                 f"centred at {before}, got {tuple(mem.features.shape)} centred at {mem.before}")
            mask = mem.mask.clone()
            # empty slots are zero features, as the published pool pads them
            feats = mem.features.to(pooled.dtype) * mask[..., None]
        current = layout.pad(pooled.detach())[:, :per_sec]                    # (B, <=M, D)
        centre_mask = layout.mask[:, :per_sec]
        feats[:, before] = 0
        feats[:, before, :current.shape[1]] = current * centre_mask[..., None]
        mask[:, before] = False
        mask[:, before, :centre_mask.shape[1]] = centre_mask
        return feats.view(clips, seconds * per_sec, -1), mask.view(clips, -1)

    def forward(self, batch: HeadInput) -> torch.Tensor:
        roi, pooled = self._actor_features(batch)
        layout = ClipLayout.of(batch.clip_index, batch.num_clips,
                               min_slots=0 if self.mask_padding else self.max_person)
        memory, memory_mask = self._memory(batch, layout, pooled)
        if self.mask_padding:
            person_mask = layout.mask
        else:
            # published: exactly max_person person keys, padded ones included (extra actors dropped)
            first = torch.arange(layout.num_slots, device=roi.device) < self.max_person
            person_mask = first[None].expand_as(layout.mask)
            memory_mask = None
        final = self.cycleacr_module.instance_interaction(pooled, layout, person_mask, memory, memory_mask)
        x = F.relu(self.fc1(roi + final))
        x = F.relu(self.fc2(x))
        return self.cls_score(self.predictor_dropout(x))
