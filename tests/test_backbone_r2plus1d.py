"""TSP R(2+1)D-34: the TSP checkpoint layout and plain ig65m state dicts load strictly into the full model,
errors name the offending keys, tiny features have the right shapes, and a (2+1)D convolution matches an
explicit per-frame 2D conv followed by a per-pixel 1D conv."""

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from layout_fixtures import layout, public_state_dict

from extractors import r2plus1d
from pipeline.checkpoints import load_state_dict_checked
from extractors.registry import build_backbone
from pipeline.errors import ConfigError

TSP = "tsp_r2plus1d_34.json"


@pytest.fixture(scope="module")
def full():
    return r2plus1d.build()


@pytest.fixture(scope="module")
def tsp_state():
    return public_state_dict(TSP, counters=True)  # saved by PyTorch 1.4: counters present


def ig65m_state(tsp: dict) -> dict:
    """An ig65m r2plus1d_34 file: the same backbone with no prefix and a 400-class ``fc`` head."""
    sd = {k.removeprefix("features."): v for k, v in tsp.items() if k.startswith("features.")}
    return {**sd, "fc.weight": torch.randn(400, 512), "fc.bias": torch.randn(400)}


def load(model, sd):
    return load_state_dict_checked(model, sd, r2plus1d.FORMATS, source="ck.pth", target="r2plus1d_34")


def clips(b=2, t=8, size=32, seed=1):
    return torch.randn(b, 3, t, size, size, generator=torch.Generator().manual_seed(seed))


def test_full_model_matches_the_tsp_backbone_layout(full):
    public = {k.removeprefix("features."): s for k, s in layout(TSP).items() if k.startswith("features.")}
    assert {k: list(v.shape) for k, v in full.state_dict().items()} == public
    assert full.feature_dim == 512 and full.in_channels == 3
    bns = [m for m in full.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(bns) == 69 and all(m.eps == 1e-3 for m in bns)


def test_middle_widths_are_per_convolution():
    # layer2.0: conv1 64 -> 128 and conv2 128 -> 128 have different middle widths (230, 288)
    assert (r2plus1d.mid_channels(64, 128), r2plus1d.mid_channels(128, 128)) == (230, 288)
    assert r2plus1d.mid_channels(64, 64) == 144 and r2plus1d.mid_channels(256, 512) == 921


def test_tsp_checkpoint_loads_strictly_without_its_heads(full, tsp_state):
    fmt, dropped, skipped = load(full, tsp_state)
    assert fmt == "HumamAlwassel/TSP checkpoint['model']" and skipped == []
    assert sorted(dropped) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    state = full.state_dict()
    for key in ("stem.0.weight", "layer2.0.conv2.0.0.weight", "layer4.2.conv1.0.1.running_var",
                "layer3.0.downsample.1.bias"):
        assert torch.equal(state[key], tsp_state["features." + key]), key


def test_ig65m_state_dict_loads_strictly_without_fc(full, tsp_state):
    sd = ig65m_state(tsp_state)
    fmt, dropped, skipped = load(full, sd)
    assert fmt == "ig65m-pytorch r2plus1d_34 state dict" and skipped == []
    assert sorted(dropped) == ["fc.bias", "fc.weight"]
    assert torch.equal(full.state_dict()["layer1.1.conv2.0.3.weight"], sd["layer1.1.conv2.0.3.weight"])


def test_a_renamed_key_fails_naming_it(full, tsp_state):
    sd = dict(tsp_state)
    sd["features.layer3.4.conv1.0.1.running_meen"] = sd.pop("features.layer3.4.conv1.0.1.running_mean")
    with pytest.raises(ConfigError) as err:
        load(full, sd)
    msg = str(err.value)
    assert "nearest known layout: HumamAlwassel/TSP checkpoint['model']" in msg
    assert "missing (1): layer3.4.conv1.0.1.running_mean;" in msg
    assert "unexpected (1): features.layer3.4.conv1.0.1.running_meen (as layer3.4.conv1.0.1.running_meen)" in msg


def test_a_changed_shape_fails_naming_it(full, tsp_state):
    sd = ig65m_state(tsp_state)
    sd["layer2.0.conv2.0.0.weight"] = torch.zeros(230, 128, 1, 3, 3)  # torchvision's per-block middle width
    with pytest.raises(ConfigError, match=r"shape mismatch \(1\): layer2\.0\.conv2\.0\.0\.weight checkpoint "
                                          r"\[230, 128, 1, 3, 3\] vs model \[288, 128, 1, 3, 3\]"):
        load(full, sd)


def test_build_reads_a_training_checkpoint_file(tmp_path: Path):
    source = r2plus1d.build(tiny=True, seed=4)
    path = tmp_path / "epoch_5.pth"
    state = {"features." + k: v for k, v in source.state_dict().items()}
    torch.save({"model": {**state, "fc1.weight": torch.zeros(200, 64)}, "optimizer": {"state": {}},
                "args": argparse.Namespace(backbone="r2plus1d_34"), "epoch": 5}, path)
    model = build_backbone("r2plus1d_34", tiny=True, seed=0, weights=path)
    (report,) = model.weight_reports
    assert report.dropped == ("fc1.weight",) and len(report.sha256) == 64
    x = clips()
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    with pytest.raises(ConfigError, match=r"absent\.pth: checkpoint file not found; needed: r2plus1d_34-tsp_on_"):
        r2plus1d.build(tiny=True, weights=tmp_path / "absent.pth")


def test_full_model_gives_512_features_per_clip(full):
    with torch.no_grad():
        out = full(clips(b=1))
    assert out.shape == (1, 512) and out.dtype == torch.float32


def test_tiny_gives_one_feature_per_clip_and_strides_8_16_16():
    model = r2plus1d.build(tiny=True)
    assert model.feature_dim == 64 and not model.training
    with torch.no_grad():
        assert model.forward_map(clips(t=16, size=112)).shape == (2, 64, 2, 7, 7)
        out = model(clips())
    assert out.shape == (2, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_eval_mode_is_deterministic_and_seeded():
    a, b, c = (r2plus1d.build(tiny=True, seed=s) for s in (5, 5, 6))
    x = clips()
    with torch.no_grad():
        first = a(x)
        assert torch.equal(first, a(x)) and torch.equal(first, b(x))
        assert not torch.allclose(first, c(x))


def test_bf16_autocast_agrees_with_fp32():
    """Same bound as for I3D: bf16 unit roundoff 0.2 %, ~sqrt(20) rounded layers -> ~1 %; measured
    0.4-0.6 %; 2 % relative L2 and cosine > 0.999 catch real breakage, not rounding."""
    model = r2plus1d.build(tiny=True, seed=0)
    x = clips()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    assert ((low - ref).norm() / ref.norm()).item() < 0.02
    assert F.cosine_similarity(low, ref).min().item() > 0.999


def test_conv2plus1d_is_a_2d_conv_per_frame_then_a_1d_conv_per_pixel():
    torch.manual_seed(0)
    block = r2plus1d.Conv2Plus1D(3, 5, stride=2).eval()
    spatial, bn, _, temporal = block
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        x = torch.randn(2, 3, 6, 9, 9)
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        y = F.conv2d(frames, spatial.weight[:, :, 0], stride=2, padding=1)  # [B*T, M, 5, 5]
        y = F.relu((y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-3)
                   * bn.weight[:, None, None] + bn.bias[:, None, None])
        m, ho, wo = y.shape[1:]
        pixels = y.reshape(b, t, m, ho, wo).permute(0, 3, 4, 2, 1).reshape(b * ho * wo, m, t)
        z = F.conv1d(pixels, temporal.weight[:, :, :, 0, 0], stride=2, padding=1)  # [B*H*W, 5, 3]
        expected = z.reshape(b, ho, wo, 5, -1).permute(0, 3, 4, 1, 2)
        out = block(x)
    assert spatial.weight.shape == (r2plus1d.mid_channels(3, 5), 3, 1, 3, 3)
    assert out.shape == (2, 5, 3, 5, 5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
