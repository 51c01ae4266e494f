"""The AVA heads: published sizes and key layouts, strict loading of released files, per-clip relations
that never see another clip or padding, CycleACR's memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detectors.heads import HEADS, ActorMemory, HeadInput, build_head
from pipeline.checkpoints import load_state_dict_checked
from pipeline.errors import ConfigError
from ava_fixtures import RandomMaps
from tests.layout_fixtures import layout, public_state_dict

LAYOUTS = {"acar": "heads_acar_r50.json", "acrn": "heads_acrn_r50.json", "cycleacr": "heads_cycleacr_r101.json"}
# parameter counts of the published heads (reference notes, section 7)
PUBLISHED_PARAMS = {"acar": 25_229_312, "acrn": 58_588_497, "cycleacr": 58_611_280}

C, H, W, T = 48, 6, 7, 8
SMALL = {
    "roi_linear": dict(in_channels=C, num_classes=10),
    "acrn": dict(in_channels=C, hidden=24, num_classes=10),
    "acar": dict(in_channels=C, reduce_dim=24, hidden_dim=16, num_classes=10, num_pose=3),
    "cycleacr": dict(in_channels=C, dim_inner=16, temporal_len=T, num_classes=10, class_groups=(3, 4, 3),
                     mlp_dim=32, memory_length=(2, 2), max_per_sec=3),
}


def clips(counts, seed=0, channels=C, height=H, width=W):
    """A batch with counts[i] actors in clip i (random boxes, maps, context tokens)."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(len(counts), channels, height, width, generator=gen)
    context = torch.randn(len(counts), channels, T, generator=gen)
    index = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)]).long()
    xy = torch.rand(len(index), 4, generator=gen)
    boxes = torch.cat([torch.minimum(xy[:, :2], xy[:, 2:]), torch.maximum(xy[:, :2], xy[:, 2:]) + 0.05], 1)
    return HeadInput(maps=maps, rois=torch.cat([index[:, None].float(), boxes.clamp(max=1)], 1),
                     clip_index=index, image_size=torch.tensor([[height * 16, width * 16]] * len(counts)),
                     context=context)


def concat(a: HeadInput, b: HeadInput) -> HeadInput:
    """b's clips appended after a's."""
    shift = a.num_clips
    rois_b = torch.cat([b.rois[:, :1] + shift, b.rois[:, 1:]], 1)
    return HeadInput(maps=torch.cat([a.maps, b.maps]), rois=torch.cat([a.rois, rois_b]),
                     clip_index=torch.cat([a.clip_index, b.clip_index + shift]),
                     image_size=torch.cat([a.image_size, b.image_size]),
                     context=torch.cat([a.context, b.context]))


def small(name, **kw):
    torch.manual_seed(1)
    head = build_head(name, **{**SMALL[name], **kw}).eval()
    with torch.no_grad():  # published inits (zero output convs, std 0.01) would hide the relation paths
        for p in head.parameters():
            p.normal_(std=p[0].numel() ** -0.5 if p.dim() > 1 else 0.2)
    return head


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_published_configuration_has_the_published_size_and_keys(name):
    head = build_head(name)
    assert sum(p.numel() for p in head.parameters()) == PUBLISHED_PARAMS[name]
    fmt = head.released[0]
    public = layout(LAYOUTS[name])
    converted, _, _ = fmt.convert({k: torch.empty(0) for k in public})
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert set(converted) == set(ours)
    assert sum(torch.Size(s).numel() for s in public.values()) == sum(torch.Size(s).numel() for s in ours.values())


def test_acar_r101_variant_size():
    assert sum(p.numel() for p in build_head("acar", depth=1, mlp_1x1=True).parameters()) == 13_693_952


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_released_file_loads_strictly_and_a_corrupted_copy_is_refused_by_name(name, tmp_path):
    public = public_state_dict(LAYOUTS[name], counters=True)
    head = build_head(name)
    backbone = {("module." if name != "acrn" else "") + "backbone.stem.weight": torch.zeros(3)}
    container = {"acar": lambda sd: sd, "acrn": lambda sd: {"state_dict": sd, "meta": {}},
                 "cycleacr": lambda sd: {"model": sd, "iteration": 5}}[name]
    path = tmp_path / "released.pth"
    torch.save(container({**backbone, **public}), path)
    report = head.load_released(path)
    assert report.dropped  # the backbone keys were set aside, everything else consumed
    fmt = head.released[0]
    first = next(k for k in public if not k.endswith("num_batches_tracked"))
    ours = head.state_dict()
    assert torch.equal(ours[fmt.model_key(first.removeprefix("module."))], public[first])

    # the published head on a published-width map: one clip, two actors, one logit per published class
    batch = clips([2], channels=2304, height=4, width=5)
    batch.context = torch.randn(1, 2304, 32)
    with torch.no_grad():
        assert head.eval()(batch).shape == (2, {"acar": 60, "acrn": 80, "cycleacr": 80}[name])

    missing = {k: v for k, v in public.items() if k != first}
    with pytest.raises(ConfigError, match=r"missing \(1\): " + fmt.model_key(first.removeprefix("module."))):
        load_state_dict_checked(head, missing, head.released, source="x.pth", target=name)
    reshaped = {**public, first: public[first][:1]}
    with pytest.raises(ConfigError, match="shape mismatch.*" + first.removeprefix("module.")):
        load_state_dict_checked(head, reshaped, head.released, source="x.pth", target=name)
    extra = {**public, first.replace("weight", "wieght"): public[first]}
    with pytest.raises(ConfigError, match="unexpected"):
        load_state_dict_checked(head, extra, head.released, source="x.pth", target=name)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_output_shapes_and_a_finite_loss_with_gradients(name):
    head = small(name).train()
    batch = clips([1, 3, 2])
    logits = head(batch)
    assert logits.shape == (6, 10)
    targets = torch.zeros(6, 10)
    targets[torch.arange(6), torch.arange(6) % 3] = 1
    targets[:, 5] = 1
    loss = head.loss(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in head.named_parameters() if "temporal_position_k" not in n)
    scores = head.scores(logits)
    assert scores.shape == logits.shape and scores.min() >= 0 and scores.max() <= 1


HEAD_MODES = [("roi_linear", {}), ("acrn", {}), ("acar", {}), ("cycleacr", {}),
              ("cycleacr", {"mask_padding": True})]


@pytest.mark.parametrize("name,kw", HEAD_MODES)
@pytest.mark.parametrize("extra", [0, 1, 19])
def test_a_clip_ignores_the_clips_batched_beside_it(name, kw, extra):
    head = small(name, **kw)
    alone = clips([4], seed=2)
    other = clips([extra], seed=3)
    with torch.no_grad():
        want = head(alone)
        got_after = head(concat(alone, other))[:4]
        got_before = head(concat(other, alone))[extra:]
    assert torch.allclose(got_after, want, atol=1e-5)
    assert torch.allclose(got_before, want, atol=1e-5)


@pytest.mark.parametrize("name,kw", HEAD_MODES)
def test_actor_order_inside_a_batch_does_not_matter(name, kw):
    head = small(name, **kw)
    # at most max_per_sec actors per clip: CycleACR's centre memory second keeps the first ones
    batch = clips([3, 1, 3], seed=4)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    shuffled = HeadInput(maps=batch.maps, rois=batch.rois[perm], clip_index=batch.clip_index[perm],
                         image_size=batch.image_size, context=batch.context)
    with torch.no_grad():
        assert torch.allclose(head(shuffled), head(batch)[perm], atol=1e-5)


def test_relation_heads_see_the_other_actors_of_their_clip():
    for name in ("acar", "cycleacr"):
        head = small(name)
        batch = clips([3], seed=5)
        moved = HeadInput(**{**batch.__dict__, "rois": batch.rois.clone()})
        moved.rois[2, 1:] = torch.tensor([0.0, 0.0, 0.3, 0.3])
        with torch.no_grad():
            assert not torch.allclose(head(batch)[0], head(moved)[0], atol=1e-4), name


def test_acar_zero_padding_reproduces_the_batch_dependence_of_issue_8():
    head = small("acar", padding="zeros")
    alone = clips([2], seed=2)
    with torch.no_grad():
        want = head(alone)
        got = head(concat(alone, clips([5], seed=3)))[:2]
    assert not torch.allclose(got, want, atol=1e-4)
    masked = small("acar")
    with torch.no_grad():  # without padding (one clip) both modes are the published per-clip loop
        assert torch.allclose(masked(alone), want, atol=1e-6)


def test_acrn_split_conv_equals_the_published_concatenation():
    head = small("acrn")
    for m in (head.conv1.bn, head.conv2.bn):
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2)
    batch = clips([2, 3], seed=6)
    from detectors.roi_align import roi_align
    with torch.no_grad():
        pooled = roi_align(batch.maps, batch.pixel_rois(), 8, 1 / 16, 0, True)
        actor = pooled.amax(dim=(-2, -1))
        tiled = actor[:, :, None, None, None].expand(-1, -1, 1, H, W)
        x = torch.cat([tiled, batch.maps[batch.clip_index].unsqueeze(2)], 1)
        x = F.relu(head.conv1.bn(head.conv1.conv(x)))
        x = F.relu(head.conv2.bn(head.conv2.conv(x)))
        want = head.fc_cls(x.mean(2).amax(dim=(-2, -1)))[:, 1:]
        assert torch.allclose(head(batch), want, atol=1e-5)


def cycle_memory(head, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    before, after = head.memory_length
    shape = (batch.num_clips, before + 1 + after, head.max_per_sec)
    return ActorMemory(features=torch.randn(*shape, head.dim_inner, generator=gen),
                       mask=torch.rand(*shape, generator=gen) < 0.6, before=before)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_cycleacr_memory_acts_only_through_neighbouring_keyframes_of_the_same_clip(mask_padding):
    head = small("cycleacr", mask_padding=mask_padding)
    batch = clips([2, 3], seed=7)
    memory = cycle_memory(head, batch)
    with torch.no_grad():
        without = head(batch)
        empty = ActorMemory(memory.features, torch.zeros_like(memory.mask), memory.before)
        assert torch.allclose(head(HeadInput(**{**batch.__dict__, "memory": empty})), without, atol=1e-6)

        with_mem = head(HeadInput(**{**batch.__dict__, "memory": memory}))
        assert not torch.allclose(with_mem[:2], without[:2], atol=1e-4)

        # the centre second is the clip itself: whatever the bank holds there is replaced
        centre = ActorMemory(memory.features.clone(), memory.mask.clone(), memory.before)
        centre.features[:, memory.before] = 5.0
        centre.mask[:, memory.before] = True
        assert torch.allclose(head(HeadInput(**{**batch.__dict__, "memory": centre})), with_mem, atol=1e-6)

        # a change in clip 1's neighbours moves clip 1 only
        changed = ActorMemory(memory.features.clone(), memory.mask.clone(), memory.before)
        changed.features[1, 0] += 3.0
        changed.mask[1, 0] = True
        got = head(HeadInput(**{**batch.__dict__, "memory": changed}))
        assert torch.allclose(got[:2], with_mem[:2], atol=1e-6)
        assert not torch.allclose(got[2:], with_mem[2:], atol=1e-4)

        # empty slots are never read (published mode: they enter as zero features, like its padding)
        junk = ActorMemory(memory.features.masked_fill(~memory.mask[..., None], 7.0), memory.mask,
                           memory.before)
        assert torch.allclose(head(HeadInput(**{**batch.__dict__, "memory": junk})), with_mem, atol=1e-6)


def test_memory_gather_from_a_bank():
    bank = {("v", 900): torch.ones(2, 4), ("v", 903): torch.full((7, 4), 2.0), ("w", 901): torch.ones(1, 4)}
    mem = ActorMemory.gather(bank, [("v", 901), ("w", 901)], length=(2, 2), max_per_sec=3, dim=4)
    assert mem.features.shape == (2, 5, 3, 4)
    assert mem.mask[0].sum(1).tolist() == [0, 2, 0, 0, 3]  # 899 absent, 900: 2, centre skipped, 903: 3 of 7
    assert mem.mask[1].sum() == 0  # w's own keyframe is the centre, nothing else in the bank
    assert torch.all(mem.features[0, 4] == 2.0)


def test_cycleacr_bias_quirk_is_an_option():
    published = {k for k in build_head("cycleacr", **SMALL["cycleacr"]).state_dict() if k.endswith(".bias")}
    plain = {k for k in build_head("cycleacr", conv_bias=False, **SMALL["cycleacr"]).state_dict()
             if k.endswith(".bias")}
    assert "cycleacr_module.cycle_modeling.local_a2c_blocks.0.query.bias" in published
    # without the quirk only roi_dim_reduce (built without the flag) and the linear layers keep biases
    assert plain == {"cycleacr_module.roi_dim_reduce.bias", "fc1.bias", "fc2.bias", "cls_score.bias"}


def test_build_head_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown detection head 'nope'"):
        build_head("nope")
    with pytest.raises(ValueError, match="padding"):
        build_head("acar", padding="reflect", reduce_dim=8, hidden_dim=8, in_channels=8)
    with pytest.raises(ValueError, match="needs HeadInput.context"):
        small("cycleacr")(HeadInput(**{**clips([1]).__dict__, "context": None}))


def test_a_batch_moves_to_a_device_whole():
    batch = clips([2, 1])
    batch.memory = ActorMemory(torch.zeros(2, 3, 2, 4), torch.zeros(2, 3, 2, dtype=torch.bool), before=1)
    moved = batch.to("meta")
    tensors = [moved.maps, moved.rois, moved.clip_index, moved.image_size, moved.context,
               moved.memory.features, moved.memory.mask]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.feature_stride == batch.feature_stride and moved.memory.before == 1


# the demo's optimiser (data/demo_ava.yaml); CycleACR at its own AdamW lr (README, Detection)
DEMO_LR = {"roi_linear": 3e-3, "acrn": 3e-3, "acar": 3e-3, "cycleacr": 3e-4}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_fits_a_tiny_fixed_problem_with_the_demo_recipe(name, tmp_path):
    from detectors.config import detect_config
    from detectors.data import Keyframe
    from detectors.train import LOG, fit

    rng = torch.Generator().manual_seed(3)
    kfs = []
    for i in range(6):
        n = 1 + i % 3
        xy = torch.rand(n, 2, generator=rng) * 0.5
        boxes = torch.cat([xy, xy + 0.2 + torch.rand(n, 2, generator=rng) * 0.3], 1).numpy()
        targets = torch.zeros(n, 10)
        targets[torch.arange(n), torch.randint(0, 3, (n,), generator=rng)] = 1  # one pose class each
        targets[:, 3:] = (torch.rand(n, 7, generator=rng) < 0.3).float()
        kfs.append(Keyframe("v", 902 + i, boxes, targets.numpy(), torch.ones(n).numpy()))
    cfg = detect_config({"head": name, "optimizer": "adamw", "lr": DEMO_LR[name], "weight_decay": 1e-4,
                         "warmup_epochs": 1, "epochs": 8, "batch_size": 2, "box_jitter": 0.0})
    torch.manual_seed(0)
    head = build_head(name, **SMALL[name])  # the published initialisation
    maps = RandomMaps([k.rid for k in kfs], (C, H, W, T))
    fit(cfg, cfg.recipe(head.recipe, cfg.batch_size), head, kfs, maps, tmp_path,
        log=lambda m: None)
    lines = (tmp_path / LOG).read_text().splitlines()
    column = lines[0].split(",").index("loss")
    losses = [float(line.split(",")[column]) for line in lines[1:]]
    assert all(map(math.isfinite, losses))
    # CycleACR's published init (std 0.01 projections, zero output convs) at lr 3e-4 moves slowly here
    assert losses[-1] < (0.99 if name == "cycleacr" else 0.95) * losses[0], losses
    assert max(losses[1:]) < 1.1 * losses[0], losses  # no blow-up on the way (CycleACR's went x4000)
