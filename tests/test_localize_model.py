"""ActionFormer model: shapes of every level, parity with the official code, attention, padding,
long inputs, the official checkpoint layout, config validation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from localizers.actionformer import LossNormalizer, Outputs, collate, compute_losses, detect, regressed_points
from localizers.assign import assign_targets
from localizers.blocks import attend, attention_mask_for
from localizers.checkpoint_compat import load_checkpoint
from localizers.config import PRESETS, ModelConfig, TrainConfig, resolve
from localizers.models import build_model
from pipeline.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_config(**kw) -> ModelConfig:
    base = dict(input_dim=16, num_classes=3, embed_dim=32, backbone_arch=(2, 2, 3), n_head=4, window=(5,) * 4,
                max_seq_len=64, regression_ranges=((0, 4), (4, 8), (8, 16), (16, 10000)))
    return ModelConfig(**{**base, **kw})


def test_shapes_of_every_level():
    cfg = tiny_config()
    model = build_model(cfg).eval()
    batch, mask = collate([torch.randn(40, 16), torch.randn(64, 16)], cfg, training=True)
    assert batch.shape == (2, 64, 16) and mask.sum(1).tolist() == [40, 64]
    levels, masks = model.backbone(batch, mask)
    assert [tuple(f.shape) for f in levels] == [(2, 64 // s, 32) for s in (1, 2, 4, 8)]
    assert [m.shape[1] for m in masks] == [64, 32, 16, 8]
    assert masks[3][0].sum() == 5  # ceil(40 / 8) valid steps at stride 8
    out = model(batch, mask)
    assert out.level_lengths == [64, 32, 16, 8]
    assert out.logits.shape == (2, 120, 3) and out.offsets.shape == (2, 120, 2) and out.mask.shape == (2, 120)
    assert out.points[:, 3].tolist() == [1.0] * 64 + [2.0] * 32 + [4.0] * 16 + [8.0] * 8
    assert (out.offsets >= 0).all()


def test_thumos_model_matches_the_published_layout():
    cfg = PRESETS["thumos_i3d"].with_dims(2048, 20)
    model = build_model(cfg)
    layout = json.loads((FIXTURES / "actionformer_thumos_i3d.json").read_text())["keys"]
    ours = {PREFIX + k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: shape for k, (shape, _) in layout.items()}
    assert sum(p.numel() for p in model.parameters()) == 29_251_612


PREFIX = "module."


def test_official_checkpoint_layout_loads_strictly(tmp_path):
    """A file shaped like the official epoch_034.pth.tar (DataParallel prefix, both weight sets)."""
    layout = json.loads((FIXTURES / "actionformer_thumos_i3d.json").read_text())["keys"]
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=gen) for k, (shape, _) in layout.items()}
    ema = {k: v + 1 for k, v in sd.items()}
    path = tmp_path / "epoch_034.pth.tar"
    torch.save({"epoch": 35, "state_dict": sd, "state_dict_ema": ema, "optimizer": {}, "scheduler": {}}, path)
    model = build_model(PRESETS["thumos_i3d"].with_dims(2048, 20))
    load_checkpoint(model, path, "ema")
    key = "cls_head.cls_head.conv.bias"
    assert torch.equal(model.state_dict()[key], ema[PREFIX + key])
    load_checkpoint(model, path, "model")
    assert torch.equal(model.state_dict()["reg_head.scale.3.scale"], sd[PREFIX + "reg_head.scale.3.scale"])
    # a checkpoint of another shape is refused, naming the keys
    bad = dict(sd)
    del bad[PREFIX + "neck.fpn_norms.5.bias"]
    with pytest.raises(ConfigError, match="missing neck.fpn_norms.5.bias"):
        load_checkpoint(model, {"state_dict": bad, "state_dict_ema": bad}, "ema")
    with pytest.raises(ConfigError, match=r"cls_head.cls_head.conv.weight \(20, 512, 3\) vs \(10, 512, 3\)"):
        load_checkpoint(build_model(PRESETS["thumos_i3d"].with_dims(2048, 10)), path)


def test_parity_with_the_official_implementation():
    """Logits, offsets, targets and losses equal those of the official code (fork 1.5.0) with the same
    weights, also when we pad less than it does (first batch: 20 and 37 steps, it pads to 64, we to 41,
    whose levels of 41, 21, 11 and 6 steps each keep one padded step)."""
    ref = torch.load(FIXTURES / "actionformer_parity.pt", weights_only=False)
    cfg = tiny_config()
    model = build_model(cfg).eval()
    model.load_state_dict(ref["state_dict"])
    n = 3
    segs = torch.zeros(2, n, 2)
    labels = torch.zeros(2, n, dtype=torch.long)
    valid = torch.zeros(2, n, dtype=torch.bool)
    for i, (s, l) in enumerate(zip(ref["segments"], ref["labels"])):
        segs[i, : len(l)], labels[i, : len(l)], valid[i, : len(l)] = s, l, True
    for b in ref["batches"]:
        feats = [b["x"][i, :n_i] for i, n_i in enumerate(b["lengths"].tolist())]
        x, mask = collate(feats, cfg, training=True)
        assert x.shape[1] == (41 if max(b["lengths"]) == 37 else 64)
        with torch.no_grad():
            out = model(x, mask)
        m = b["mask"]
        # compare on the official (possibly longer) layout: our points are a prefix of each level
        starts = [0, 64, 96, 112]
        ours_rows = torch.cat([torch.arange(s_ref, s_ref + n_l) for s_ref, n_l in zip(starts, out.level_lengths)])
        ref_logits, ref_offsets = b["logits"][:, ours_rows], b["offsets"][:, ours_rows]
        assert torch.equal(out.mask, m[:, ours_rows])
        valid_pts = out.mask[..., None]
        assert torch.allclose(out.logits * valid_pts, ref_logits * valid_pts, atol=1e-5)
        assert torch.allclose(out.offsets * valid_pts, ref_offsets * valid_pts, atol=1e-5)
        cls_t, reg_t = assign_targets(b["points"], segs, labels, valid, 3, 1.5)
        assert torch.equal(cls_t, b["gt_cls"]) and torch.allclose(reg_t, b["gt_offsets"])
        ref_out = Outputs(b["logits"], b["offsets"], m, b["points"], [64, 32, 16, 8])
        losses = compute_losses(ref_out, segs, labels, valid, LossNormalizer(100, 0.9), TrainConfig())
        assert losses["cls_loss"].item() == pytest.approx(b["losses"]["cls_loss"], rel=1e-5)
        assert losses["reg_loss"].item() == pytest.approx(b["losses"]["reg_loss"], rel=1e-5)


def test_regression_head_at_the_positives_only_gives_the_same_offsets_and_gradients():
    """Training runs the regression head at the points the loss reads (windows of their receptive
    field, edges and level boundaries included): the same offsets there, zero elsewhere, the same
    gradients, the same logits."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg).train()
    with torch.no_grad():
        for p in model.parameters():  # away from the zero / constant initialisation
            p.add_(0.05 * torch.randn_like(p))
    x, mask = collate([torch.randn(40, 16), torch.randn(64, 16)], cfg, training=True)
    # actions at both ends of the videos and in the middle, on several levels
    segs = torch.tensor([[[0.0, 3.0], [20.0, 38.0], [0.0, 0.0]], [[0.0, 3.0], [30.0, 63.0], [58.0, 63.5]]])
    labels = torch.tensor([[0, 1, 0], [2, 1, 0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    need = regressed_points(cfg, x.shape[1], segs, labels, valid, 1.5)
    levels_hit = {int(torch.bucketize(i, torch.tensor([64, 96, 112, 120]), right=True)) for i in need.nonzero()[:, 1]}
    assert need.sum() >= 10 and len(levels_hit) >= 3 and need[:, 1].any() and need[:, -1].any()
    grads = []
    for where in (None, need):
        torch.manual_seed(1)  # the same drop-path draws
        out = model(x, mask, where)
        weights = torch.arange(2 * 120 * 2, dtype=torch.float32).view(2, 120, 2) % 7
        (out.offsets[need] * weights[need]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
        if where is None:
            full = out
    assert torch.allclose(out.offsets[need], full.offsets[need], atol=1e-6) and (out.offsets[~need] == 0).all()
    assert torch.equal(out.logits, full.logits)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, atol=1e-6 * max(1.0, float(g.abs().max()))), name


def test_blocked_local_attention_equals_banded_dense_attention():
    torch.manual_seed(0)
    b, t, c, heads, window = 2, 75, 16, 4, 9
    q, k, v = (torch.randn(b, t, c) for _ in range(3))
    mask = torch.arange(t)[None] < torch.tensor([75, 41])[:, None]
    out = attend(q, k, v, attention_mask_for(mask, window, 32), heads, window, 32)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    allowed = ((i - j).abs() <= window // 2)[None] & mask[:, None, :]
    split = lambda x: x.view(b, t, heads, c // heads).transpose(1, 2)
    logits = split(q) @ split(k).transpose(-1, -2) / (c // heads) ** 0.5
    ref = F.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), -1) @ split(v)
    ref = ref.transpose(1, 2).reshape(b, t, c)
    assert torch.allclose(out[mask], ref[mask], atol=1e-5)
    assert torch.isfinite(out).all()


def test_long_video_inference_without_crop():
    cfg = tiny_config(max_seq_len=32)
    model = build_model(cfg).eval()
    feats = torch.randn(301, 16)  # longer than max_seq_len: padded to a multiple of max_div_factor
    x, mask = collate([feats], cfg, training=False)
    assert x.shape[1] % cfg.max_div_factor == 0 and x.shape[1] >= 301
    segs, scores, labels = detect(model, feats, PRESETS["thumos_i3d"].test)
    assert segs.shape[1] == 2 and len(segs) == len(scores) == len(labels) <= 200
    assert (scores[:-1] >= scores[1:]).all()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        collate([feats], cfg, training=True)


def test_config_resolution_and_errors():
    cfg = resolve({"preset": "thumos_i3d", "epochs": 3, "window": [9, 9, 9, 9, 9, 9]})
    assert cfg.train.epochs == 3 and cfg.model.window == (9,) * 6 and cfg.model.embed_dim == 512
    assert cfg.train.total_epochs == 8 and cfg.model.max_div_factor == 32 * 8
    assert resolve({"preset": "anet_tsp"}).data.resize_to == 192
    for params, match in (({"preset": "nope"}, "localize.preset"), ({"epochs": 0}, "localize.epochs"),
                          ({"window": [19]}, "localize.window"),
                          ({"max_seq_len": 100}, "localize.max_seq_len"), ({"reg_loss": "l1"}, "localize.reg_loss")):
        with pytest.raises(ConfigError, match=match):
            resolve(params)
    with pytest.raises(ConfigError, match="localize.input_dim: set to 2048 but the feature store's feature_dim is 1024"):
        resolve({"input_dim": 2048}).with_dims(1024, 20)
    assert resolve({}).with_dims(1024, 20).model.input_dim == 1024
    assert replace(resolve({"num_classes": 1}).with_dims(512, 200).model).num_classes == 1


def test_video_level_score_fusion(tmp_path):
    """ActivityNet: class-agnostic detections take the video's top-k external classes, score x class score."""
    from localizers.actionformer import fuse_video_scores, load_video_scores

    path = tmp_path / "cls.json"
    path.write_text(json.dumps({"results": {"v": [0.1, 0.7, 0.2]}, "class": ["a", "b", "c"]}))
    scores = load_video_scores(str(path), ("c", "b", "a"))
    assert scores["v"].tolist() == [0.2, 0.7, 0.1]
    dets = [{"label": "", "score": 0.5, "segment": [1.0, 2.0]}, {"label": "", "score": 0.4, "segment": [3.0, 4.0]}]
    fused = fuse_video_scores(dets, scores["v"], ("c", "b", "a"), topk=2, max_detections=3)
    assert [(d["label"], round(d["score"], 3), d["segment"][0]) for d in fused] == \
        [("b", 0.35, 1.0), ("b", 0.28, 3.0), ("c", 0.1, 1.0)]
