"""The ActionFormer family's options: each trains on the synthetic features and beats a trivial
baseline; the boundary distributions (DFL, decoding by the expectation); backbone v2's attention;
padding independence of the new blocks; each NMS / constraint option on hand-made cases; the config
checks of the combinations; the registry."""

from __future__ import annotations

from dataclasses import replace
from typing import get_args

import numpy as np
import pytest
import torch

from localize_synthetic import items_of, make_videos, write_dataset, CLASSES, CLIP, DIM, FPS, STRIDE
from localizers.actionformer import Outputs, collate, decode_video, detect, video_detections
from localizers.anet_map import evaluate_detections
from localizers.blocks import attend, attention_mask_for
from localizers.blocks_v2 import apply_rotary, rotary_tables
from localizers.config import PRESETS, ModelConfig, resolve
from localizers.data import ArraySource
from localizers.losses import distribution_focal_loss, expected_distance, iou_loss_1d
from localizers.models import MODELS, build_model, model_module
from localizers.nms import batched_nms
from localizers.train import fit
from pipeline.annotations import load_temporal
from pipeline.errors import ConfigError
from pipeline.schema import hints
from test_params_schema import _keys, mini  # noqa: F401 (a fixture)



pytestmark = pytest.mark.usefixtures("one_thread")


def trivial_detections(train: dict, test: dict) -> dict:
    """What a localizer that learned nothing from the features can do: segments of the mean training
    action length tiled over each video (half-overlapping), each labelled with every class, scored by
    the class's share of the training actions."""
    acts = [a for _, acts in train.values() for a in acts]
    length = float(np.mean([b - a for a, b, _ in acts]))
    prior = {c: sum(a[2] == c for a in acts) / len(acts) for c in CLASSES}
    dets = {}
    for vid, (feats, _) in test.items():
        duration = (STRIDE * len(feats) + CLIP) / FPS
        starts = np.arange(0.0, max(duration - length, 0.0) + 1e-9, length / 2)
        dets[vid] = [{"label": c, "score": prior[c], "segment": [float(s), float(s + length)]}
                     for s in starts for c in CLASSES]
    return dets


VARIANTS = {  # the options each variant sets over the demo preset
    "v2": {"backbone": "v2", "n_kv_head": 2},
    "tbtformer": {"model": "tbtformer", "fpn": "bifpn", "reg_max": 8, "mlp_ratio": 6},
    "qfl": {"cls_loss": "qfl"},
    "eiou": {"reg_loss": "eiou"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_and_beats_a_trivial_baseline(tmp_path, variant):
    """The setup of test_localize_train's localisation test (24 synthetic videos, 12 epochs of the demo
    model, raw weights evaluated) with the variant's options."""
    torch.manual_seed(0)
    train, test = make_videos(24, 0), make_videos(6, 1)
    cfg = resolve({"preset": "demo", "epochs": 11, "warmup_epochs": 1, **VARIANTS[variant]}).with_dims(DIM, len(CLASSES))
    source = ArraySource({vid: f for vid, (f, _) in {**train, **test}.items()})
    result = fit(cfg, items_of(train), source, tmp_path, log=lambda m: None)
    assert type(result.model).__name__.lower() == cfg.model.model
    dets = {item.id: video_detections(result.model, source, item, cfg.test, CLASSES) for item in items_of(test)}
    ds, _ = write_dataset(tmp_path / "ds", {}, test)
    gt = load_temporal(ds.annotations)
    res = evaluate_detections(gt, dets, subset="test", tious=[0.5])
    base = evaluate_detections(gt, trivial_detections(train, test), subset="test", tious=[0.5])
    print(f"{variant}: mAP@0.5 {res.mAP[0]:.3f} (trivial baseline {base.mAP[0]:.3f})")
    assert res.mAP[0] > 0.5 and res.mAP[0] > base.mAP[0] + 0.3, res.table()


# ---------------------------------------------------------------- boundary distributions (TBTFormer)


def test_dfl_is_least_at_the_two_bins_around_the_target_and_its_expectation_is_the_target():
    target = torch.tensor([[2.25, 0.0], [5.5, 7.9]])
    r = 8
    best = torch.full((2, 2, r + 1), -30.0)
    for i in range(2):
        for j in range(2):
            t = float(target[i, j])
            lo = int(t)
            best[i, j, lo] = np.log(lo + 1 - t + 1e-12)
            if lo + 1 <= r:
                best[i, j, lo + 1] = np.log(t - lo + 1e-12)
    assert torch.allclose(expected_distance(best), target, atol=1e-4)
    shifted = best.roll(1, dims=-1)
    assert (distribution_focal_loss(best, target) < distribution_focal_loss(shifted, target)).all()
    # its minimum: the cross-entropy against the two-bin target distribution, i.e. its entropy
    w = target - target.floor()
    entropy = -(w * torch.log(w.clamp(min=1e-12)) + (1 - w) * torch.log((1 - w).clamp(min=1e-12))).mean(-1)
    assert torch.allclose(distribution_focal_loss(best, target), entropy, atol=1e-4)
    # gradient descent from a uniform distribution moves the expectation onto the target
    logits = torch.zeros(2, 2, r + 1, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=5.0)
    for _ in range(300):
        opt.zero_grad()
        distribution_focal_loss(logits, target).sum().backward()
        opt.step()
    assert torch.allclose(expected_distance(logits.detach()), target, atol=0.05)
    # a target beyond reg_max is clamped just below it
    far = distribution_focal_loss(best[:1, :1], torch.tensor([[50.0]]))
    assert torch.isfinite(far).all()


def test_tbtformer_offsets_are_the_expectation_and_decode_to_segments():
    cfg = replace(tiny_config(), model="tbtformer", reg_max=6)
    model = build_model(cfg).eval()
    x, mask = collate([torch.randn(40, 16)], cfg, training=False)
    out = model(x, mask)
    assert out.boundary_logits.shape == out.offsets.shape[:2] + (2, 7)
    assert torch.allclose(out.offsets, expected_distance(out.boundary_logits))
    assert ((out.offsets >= 0) & (out.offsets <= 6)).all()
    # hand-made: one confident point at t=16 on the stride-4 level, 1.5 and 2.5 strides to its boundaries
    p = out.points.shape[0]
    logits = torch.full((1, p, 3), -20.0)
    point = int(((out.points[:, 0] == 16) & (out.points[:, 3] == 4)).nonzero())
    logits[0, point, 1] = 5.0
    dist = torch.full((1, p, 2, 7), -30.0)
    dist[0, point, 0, 1] = dist[0, point, 0, 2] = 0.0                       # 1.5
    dist[0, point, 1, 2], dist[0, point, 1, 3] = np.log(0.5), np.log(0.5)   # 2.5
    hand = Outputs(logits, expected_distance(dist), torch.ones(1, p, dtype=torch.bool), out.points,
                   out.level_lengths, dist)
    segs, scores, labels = decode_video(hand, 0, PRESETS["demo"].test)
    top = scores.argmax()
    assert torch.allclose(segs[top], torch.tensor([16 - 1.5 * 4, 16 + 2.5 * 4]), atol=1e-4)
    assert labels[top] == 1


def tiny_config(**kw) -> ModelConfig:
    base = dict(input_dim=16, num_classes=3, embed_dim=32, backbone_arch=(2, 2, 3), n_head=4, window=(5,) * 4,
                max_seq_len=64, regression_ranges=((0, 4), (4, 8), (8, 16), (16, 10000)), drop_path=0.0)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("options", [{"backbone": "v2", "n_kv_head": 2}, {"fpn": "bifpn"},
                                     {"model": "tbtformer", "backbone": "v2", "fpn": "bifpn", "window": (0,) * 4}])
def test_outputs_at_valid_steps_do_not_depend_on_the_batch_padding(options):
    """A video's outputs alone and batched with a longer one are equal: nothing leaks from padded steps
    (as the official model, each level has a padded step after the video either way)."""
    torch.manual_seed(0)
    cfg = tiny_config(**options)
    model = build_model(cfg).eval()
    short, long = torch.randn(21, 16), torch.randn(48, 16)
    with torch.no_grad():
        alone = model(*collate([short], cfg, training=False))
        both = model(*collate([short, long], cfg, training=False))
    for a_len, b_len, a_start, b_start in zip(alone.level_lengths, both.level_lengths,
                                              np.cumsum([0] + alone.level_lengths[:-1]),
                                              np.cumsum([0] + both.level_lengths[:-1])):
        n = -(-21 * a_len // alone.level_lengths[0])  # the valid steps of this level
        ra, rb = slice(a_start, a_start + n), slice(b_start, b_start + n)
        assert torch.allclose(alone.logits[0, ra], both.logits[0, rb], atol=1e-5)
        assert torch.allclose(alone.offsets[0, ra], both.offsets[0, rb], atol=1e-5)


# ---------------------------------------------------------------- backbone v2


def test_grouped_query_attention_equals_repeated_key_value_heads():
    torch.manual_seed(0)
    b, t, heads, kv, hd, window = 2, 75, 8, 2, 4, 9
    q = torch.randn(b, t, heads * hd)
    k, v = torch.randn(b, t, kv * hd), torch.randn(b, t, kv * hd)
    mask = torch.arange(t)[None] < torch.tensor([75, 41])[:, None]

    def repeat(x):  # each kv head serves heads / kv consecutive query heads
        return x.view(b, t, kv, 1, hd).expand(b, t, kv, heads // kv, hd).reshape(b, t, heads * hd)

    for w in (window, 0):
        attn_mask = attention_mask_for(mask, w, 32)
        out = attend(q, k, v, attn_mask, heads, w, 32, n_kv_head=kv)
        ref = attend(q, repeat(k), repeat(v), attn_mask, heads, w, 32)
        assert torch.allclose(out[mask], ref[mask], atol=1e-5)


def test_rotary_scores_depend_on_the_distance_only():
    torch.manual_seed(0)
    cos, sin = rotary_tables(32, 8, torch.device("cpu"))
    q, k = torch.randn(8), torch.randn(8)
    rot = lambda x: apply_rotary(x.expand(1, 32, 1, 8), cos, sin)[0, :, 0]
    rq, rk = rot(q), rot(k)
    assert torch.allclose(rq[5] @ rk[2], rq[20] @ rk[17], atol=1e-5)
    assert torch.allclose(rq[0] @ rk[0], q @ k, atol=1e-5)
    assert not torch.allclose(rq[5] @ rk[2], rq[5] @ rk[4], atol=1e-3)


def test_scaled_backbone_widths():
    """TBTFormer's scaled backbone: 16 heads, a 6x MLP (v1: GELU; v2: SwiGLU of the same parameters)."""
    cfg = tiny_config(embed_dim=64, n_head=16, mlp_ratio=6)
    v1 = build_model(cfg).backbone.stem[0]
    assert v1.mlp[0].weight.shape == (6 * 64, 64, 1) and v1.attn.n_head == 16
    v2 = build_model(replace(cfg, backbone="v2", n_kv_head=4)).backbone.stem[0]
    assert v2.mlp.down.weight.shape == (64, 2 * 6 * 64 // 3) and v2.attn.kv.weight.shape == (2 * 4 * 4, 64)


# ---------------------------------------------------------------- losses


def test_eiou_adds_the_length_difference_to_diou():
    pred = torch.tensor([[2.0, 2.0], [1.0, 3.0], [2.0, 2.0]])
    target = torch.tensor([[2.0, 2.0], [2.0, 2.0], [1.0, 1.0]])
    diou, eiou = iou_loss_1d(pred, target, "diou"), iou_loss_1d(pred, target, "eiou")
    assert eiou[0] == diou[0] == 0
    assert torch.allclose(eiou[1], diou[1])                       # same length: no extra term
    assert torch.allclose(eiou[2] - diou[2], torch.tensor((4.0 - 2.0) ** 2 / 4.0 ** 2))


# ---------------------------------------------------------------- NMS and temporal constraints


def test_diou_nms_keeps_an_overlapping_segment_whose_centre_is_off():
    segs = torch.tensor([[0.0, 10.0], [3.0, 13.0], [1.0, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.zeros(3, dtype=torch.long)
    # [3, 13]: tIoU 7/13 = 0.538 >= 0.5, minus (3/13)^2 = 0.053 -> 0.485 < 0.5; [1, 9]: same centre, 0.8
    hard = batched_nms(segs, scores, labels, 0.5, 0.5, method="hard")
    diou = batched_nms(segs, scores, labels, 0.5, 0.5, method="diou")
    assert hard[1].tolist() == pytest.approx([0.9])
    assert diou[1].tolist() == pytest.approx([0.9, 0.8]) and diou[0].tolist() == [[0.0, 10.0], [3.0, 13.0]]


def test_class_specific_soft_nms_sigma():
    segs = torch.tensor([[0.0, 10.0], [0.0, 5.0]] * 2)
    scores = torch.tensor([0.9, 0.8, 0.9, 0.8])
    labels = torch.tensor([0, 0, 1, 1])
    sigma = torch.tensor([0.01, 10.0])
    out_segs, out_scores, out_labels = batched_nms(segs, scores, labels, 0.1, sigma, method="soft", min_score=0.01)
    kept = sorted(zip(out_labels.tolist(), out_scores.tolist()))
    # tIoU 0.5: class 0 decays to 0.8 * exp(-25) (dropped below min_score), class 1 to 0.8 * exp(-0.025)
    assert kept == [(0, pytest.approx(0.9)), (1, pytest.approx(0.8 * np.exp(-0.025))), (1, pytest.approx(0.9))]


def test_min_gap_per_class():
    centres = [10.0, 12.0, 20.0, 24.5]
    segs = torch.tensor([[c - 1, c + 1] for c in centres] * 2)
    scores = torch.tensor([0.9, 0.95, 0.5, 0.6] * 2)
    labels = torch.tensor([0] * 4 + [1] * 4)
    out_segs, out_scores, out_labels = batched_nms(segs, scores, labels, 0.1, 0.5, method="none",
                                                   min_gap=torch.tensor([5.0, 0.0]))
    by_class = {c: sorted(((s[0] + s[1]) / 2).item() for s, l in zip(out_segs, out_labels) if l == c) for c in (0, 1)}
    # class 0: 12 (0.95) removes 10; 24.5 (0.6) removes 20 (4.5 away); class 1 has no gap
    assert by_class == {0: [12.0, 24.5], 1: centres}


def test_score_temperature_and_duration_limits_in_decoding():
    lengths = [8]
    points = torch.stack([torch.arange(8.0), torch.zeros(8), torch.full((8,), 1e4), torch.ones(8)], 1)
    logits = torch.full((1, 8, 1), -20.0)
    logits[0, 2, 0], logits[0, 5, 0] = 2.0, 1.0
    offsets = torch.zeros(1, 8, 2)
    offsets[0, 2] = torch.tensor([1.0, 1.0])      # 2 steps long
    offsets[0, 5] = torch.tensor([3.0, 3.0])      # 6 steps long
    out = Outputs(logits, offsets, torch.ones(1, 8, dtype=torch.bool), points, lengths)
    test = PRESETS["demo"].test
    segs, scores, _ = decode_video(out, 0, test)
    assert sorted(scores.tolist()) == pytest.approx(sorted(torch.sigmoid(torch.tensor([2.0, 1.0])).tolist()))
    _, hot, _ = decode_video(out, 0, replace(test, score_temperature=2.0))
    assert sorted(hot.tolist()) == pytest.approx(sorted(torch.sigmoid(torch.tensor([1.0, 0.5])).tolist()))
    segs, _, _ = decode_video(out, 0, replace(test, max_duration=4.0))
    assert segs.tolist() == [[1.0, 3.0]]
    segs, _, _ = decode_video(out, 0, replace(test, duration_thresh=3.0))
    assert segs.tolist() == [[2.0, 8.0]]


def test_detect_applies_the_per_class_options():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg).eval()
    feats = torch.randn(60, 16)
    test = replace(PRESETS["demo"].test, nms_method="none")
    free = detect(model, feats, test)
    gapped = detect(model, feats, replace(test, min_gap=(4.0,)))
    centres = (gapped[0][:, 0] + gapped[0][:, 1]) / 2
    for c in range(3):
        mine = centres[gapped[2] == c]
        assert ((mine[:, None] - mine[None, :]).abs() + 1e9 * torch.eye(len(mine)) >= 4.0).all()
    assert len(gapped[1]) < len(free[1])
    # a sigma per class equal for every class is that sigma, and it is used (0.05 decays the scores of
    # overlapping detections far more than the default 0.5)
    base = PRESETS["demo"].test
    per_class = detect(model, feats, replace(base, class_nms_sigma=(0.05,) * 3))
    shared = detect(model, feats, replace(base, nms_sigma=0.05))
    default = detect(model, feats, base)
    assert torch.equal(per_class[1], shared[1]) and per_class[1].sum() < default[1].sum()


# ---------------------------------------------------------------- config


def test_the_registry_names_every_model_of_the_config():
    assert set(MODELS) == set(get_args(hints(ModelConfig)["model"]))
    for name in MODELS:  # each module gives what the training loop and the evaluation stage call
        module = model_module(ModelConfig(model=name))
        assert all(callable(getattr(module, f)) for f in ("build_model", "compute_losses", "video_detections"))


@pytest.mark.parametrize("params, message", [
    ({"backbone": "v2", "n_kv_head": 3}, "localize.n_kv_head: n_head=4 must be a multiple of n_kv_head, got 3"),
    ({"n_kv_head": 2}, "localize.n_kv_head: grouped-query attention is backbone v2's"),
    ({"backbone": "v2", "n_head": 64}, "localize.n_head: backbone v2 rotates channel pairs"),
    ({"backbone": "v2", "abs_pe": True}, "localize.abs_pe: backbone v2 has rotary positions"),
    ({"cls_loss": "qfl", "label_smoothing": 0.1}, "localize.label_smoothing: cls_loss qfl"),
    ({"model": "tbtformer", "reg_max": 3}, r"localize.reg_max: the bins must reach each level's regression range "
                                           r"in strides \(4\), got 3"),
    ({"class_nms_sigma": [0.5], "nms_method": "hard"}, "localize.class_nms_sigma: is a soft-NMS sigma per class"),
    ({"max_duration": 0.01}, "localize.max_duration: must exceed duration_thresh"),
    ({"model": "snap"}, "localize.model: expected actionformer"),
    ({"reg_loss": "ciou"}, "localize.reg_loss: expected diou | giou | eiou"),
    ({"min_gap": []}, "localize.min_gap"),
])
def test_invalid_combinations_name_the_param(params, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        resolve({"preset": "demo", **params})


def test_tbtformer_bins_are_checked_once_auto_ranges_are_drawn():
    cfg = resolve({"preset": "demo", "model": "tbtformer", "regression_ranges": "auto"})  # nothing to check yet
    assert cfg.model.regression_ranges == "auto" and cfg.with_dims(DIM, 3).model.model == "tbtformer"


def test_per_class_lists_are_checked_against_the_classes():
    ok = resolve({"preset": "demo", "class_nms_sigma": [0.5, 0.7, 0.9], "min_gap": [1.0, 0.0, 2.0]})
    assert ok.with_dims(DIM, 3).test.class_nms_sigma == (0.5, 0.7, 0.9)
    with pytest.raises(ConfigError, match=r"localize.class_nms_sigma: needs one sigma per class \(4\), got 3"):
        ok.with_dims(DIM, 4)
    with pytest.raises(ConfigError, match=r"localize.min_gap: needs one value or one per class \(4\), got 3"):
        replace(ok, test=replace(ok.test, class_nms_sigma=None)).with_dims(DIM, 4)


def test_localize_model_is_a_param_beside_the_model_section(mini, capsys, tmp_path):
    """``localize.model`` names the model class while ``localize.model.<field>`` stays the model section."""
    manifest, cache = mini
    default = _keys(capsys, manifest, cache)["localize"][0]
    flat = _keys(capsys, manifest, cache, "--set", "localize.model=tbtformer")["localize"][0]
    nested = _keys(capsys, manifest, cache, "--set", "localize.model.model=tbtformer")["localize"][0]
    exp = tmp_path / "exp.yaml"
    exp.write_text("localize: {model: tbtformer, embed_dim: 16}\n")
    from_file = _keys(capsys, manifest, cache, "--config", str(exp))["localize"][0]
    assert flat != default and flat == nested == from_file
    assert _keys(capsys, manifest, cache, "--set", "localize.model.embed_dim=32")["localize"][0] != default
