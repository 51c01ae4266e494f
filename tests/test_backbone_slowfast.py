"""SlowFast: public checkpoint layouts load strictly, key maps agree, shapes and numerics are right."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from extractors.registry import build_backbone
from pipeline.checkpoints import load_state_dict_checked
from extractors.slowfast import ARCHS, KEY_FORMATS, SlowFast, SlowFastConfig, build
from pipeline.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"
PYSLOWFAST = "slowfast_r50_8x8_pyslowfast.json"
PYTORCHVIDEO = "slowfast_r50_pytorchvideo.json"


def layout(name: str) -> dict[str, tuple[list[int], str]]:
    return json.loads((FIXTURES / name).read_text())["keys"]


def random_state_dict(keys: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Values for a layout (views of one random buffer, cheap for 34M values): BN variances positive,
    counters int64."""
    sizes = [torch.Size(shape).numel() for shape, dtype in keys.values() if dtype != "int64"]
    flat = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(seed)).sub_(0.3)
    out, offset = {}, 0
    for name, (shape, dtype) in keys.items():
        if dtype == "int64":
            out[name] = torch.tensor(7)
            continue
        n = torch.Size(shape).numel()
        out[name] = flat[offset:offset + n].view(shape)
        if name.endswith("running_var"):
            out[name].abs_().add_(0.5)
        offset += n
    return out


def pytorchvideo_names() -> dict[str, str]:
    """pySlowFast name -> pytorchvideo name, paired by position: both layouts list the same modules in the
    same order (the README's dumps of the two public implementations), heads included."""
    return dict(zip(layout(PYSLOWFAST), layout(PYTORCHVIDEO), strict=True))


def save(tmp_path: Path, obj, name: str = "ckpt.pyth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def tiny():
    return build(tiny=True, seed=0)


def clip(b=2, t=8, size=32, seed=1):
    return torch.randn(b, 3, t, size, size, generator=torch.Generator().manual_seed(seed))


def test_full_r50_loads_public_pyslowfast_layout_strictly(tmp_path):
    state = random_state_dict(layout(PYSLOWFAST))
    path = save(tmp_path, {"model_state": state, "epoch": 196, "optimizer_state": {}})
    model = build(weights=path)
    assert model.feature_dim == 2304 and model.in_channels == 3
    (report,) = model.weight_reports
    assert report.format == "pyslowfast" and len(report.sha256) == 64
    assert sorted(report.dropped) == ["head.projection.bias", "head.projection.weight"]
    loaded = model.state_dict()
    for key in ("s1.pathway1_stem.conv.weight", "s1_fuse.conv_f2s.weight", "s5.pathway0_res2.branch2.c_bn.running_var"):
        assert torch.equal(loaded[key], state[key])


def test_full_r50_accepts_public_pytorchvideo_layout_strictly():
    # keys and shapes only (meta tensors, nothing allocated); values through this map are checked on
    # the tiny model below
    with torch.device("meta"):
        model = SlowFast(SlowFastConfig(**ARCHS["r50_8x8"]))
        state = {k: torch.empty(shape, dtype=getattr(torch, dtype)) for k, (shape, dtype) in layout(PYTORCHVIDEO).items()}
    fmt, dropped, skipped = load_state_dict_checked(model, state, KEY_FORMATS, source="pytorchvideo layout",
                                                    target="slowfast r50_8x8")
    assert fmt == "pytorchvideo" and sorted(dropped) == ["blocks.6.proj.bias", "blocks.6.proj.weight"]
    assert skipped == []


def test_pytorchvideo_naming_gives_the_same_outputs_as_native(tmp_path, tiny):
    native = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() and "running_var" not in k else v
              for k, v in tiny.state_dict().items()}
    names = pytorchvideo_names()
    renamed = {names[k]: v for k, v in native.items()}
    a = build(tiny=True, seed=5, weights=save(tmp_path, {"model_state": native}, "a.pyth"))
    b = build(tiny=True, seed=6, weights=save(tmp_path, {"model_state": renamed}, "b.pyth"))
    x = clip()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a.forward_map(x), b.forward_map(x))


@pytest.mark.parametrize("change", ["rename", "shape"])
def test_one_wrong_key_fails_naming_it(tmp_path, tiny, change):
    state = dict(tiny.state_dict())
    if change == "rename":
        state["s3.pathway1_res0.branch2.bb.weight"] = state.pop("s3.pathway1_res0.branch2.b.weight")
        expected = ["s3.pathway1_res0.branch2.bb.weight", "s3.pathway1_res0.branch2.b.weight"]
    else:
        w = state["s2_fuse.conv_f2s.weight"]
        state["s2_fuse.conv_f2s.weight"] = w[:, :, :5]  # a 5x1x1 fusion kernel where the arch has 7x1x1
        expected = ["s2_fuse.conv_f2s.weight", "[16, 8, 5, 1, 1]"]
    with pytest.raises(ConfigError) as err:
        build(tiny=True, weights=save(tmp_path, {"model_state": state}))
    message = str(err.value)
    assert "\n" not in message and "pyslowfast" in message
    for text in expected:
        assert text in message


def test_published_arch_shapes_without_allocating():
    with torch.device("meta"):
        models = {arch: SlowFast(SlowFastConfig(**fields)) for arch, fields in ARCHS.items()}
    for arch, model in models.items():
        assert model.feature_dim == 2304, arch
    # fusion kernels as published: 7x1x1 for R50 8x8, 5x1x1 for R50 4x16 and R101 8x8
    assert models["r50_8x8"].s4_fuse.conv_f2s.weight.shape == (256, 128, 7, 1, 1)
    assert models["r50_4x16"].s4_fuse.conv_f2s.weight.shape == (256, 128, 5, 1, 1)
    assert models["r50_4x16"].s4_fuse.conv_f2s.stride == (8, 1, 1)
    assert models["r101_8x8"].s1_fuse.conv_f2s.weight.shape == (16, 8, 5, 1, 1)
    r101 = models["r101_8x8"].state_dict()
    assert "s4.pathway0_res22.branch2.c.weight" in r101 and "s4.pathway0_res23.branch2.c.weight" not in r101
    expected = {k: v[0] for k, v in layout(PYSLOWFAST).items() if not k.startswith("head.")}
    assert {k: list(v.shape) for k, v in models["r50_8x8"].state_dict().items()} == expected


def test_registry_builds_slowfast():
    model = build_backbone("slowfast", tiny=True)
    assert isinstance(model, SlowFast) and not model.training


def test_tiny_output_shapes_and_map_consistency(tiny):
    x = clip(b=2, t=8, size=64)
    with torch.no_grad():
        feats = tiny(x)
        slow, fast = tiny.forward_maps(x)
        fmap = tiny.forward_map(x)
    assert tiny.feature_dim == 16 * 32 + 16 * 32 // 8 == 576
    assert feats.shape == (2, 576) and feats.dtype == torch.float32
    assert slow.shape == (2, 512, 2, 2, 2) and fast.shape == (2, 64, 8, 2, 2)
    assert fmap.shape == (2, 576, 2, 2, 2)
    # the map averaged over time and space is the pooled feature (fast pooled per alpha frames first)
    torch.testing.assert_close(fmap.mean((2, 3, 4)), feats, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(feats).all() and feats.abs().mean() > 0.1


def test_res5_dilation_gives_stride_16_map():
    model = build(tiny=True, res5_dilation=2)
    with torch.no_grad():
        assert model.forward_map(clip(b=1, t=8, size=64)).shape == (1, 576, 2, 4, 4)


def test_keyframe_map_and_context_follow_the_ava_heads(tiny):
    """map: each pathway averaged over time, slow then fast; context: slow repeated to the fast length
    (nearest), concatenated with fast, max over space."""
    x = clip(b=2, t=16, size=64)
    with torch.no_grad():
        fmap, context = tiny.forward_keyframe(x)
        slow, fast = tiny.forward_maps(x)
    torch.testing.assert_close(fmap, torch.cat([slow.mean(2), fast.mean(2)], 1))
    slow_tokens = slow.amax((3, 4)).repeat_interleave(fast.shape[2] // slow.shape[2], dim=2)
    torch.testing.assert_close(context, torch.cat([slow_tokens, fast.amax((3, 4))], 1))
    assert fmap.shape == (2, 576, 2, 2) and context.shape == (2, 576, 16)


def test_ava_preset_keeps_the_public_r50_layout_at_stride_16():
    from extractors.presets import PRESETS

    kwargs = PRESETS["ava_slowfast_r50"].backbone_kwargs
    with torch.device("meta"):
        model = SlowFast(SlowFastConfig(**{**ARCHS[kwargs["arch"]], "res5_dilation": kwargs["res5_dilation"]}))
    expected = {k: v[0] for k, v in layout(PYSLOWFAST).items() if not k.startswith("head.")}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.feature_stride == 16 and model.s5.pathway0_res0.branch2.b.dilation == (1, 2, 2)


def test_slow_pathway_frames_follow_pyslowfast_packing(tiny):
    t = 32
    frames = torch.arange(t, dtype=torch.float32).view(1, 1, t, 1, 1).expand(1, 3, t, 2, 2)
    slow, fast = tiny.pathways(frames)
    assert slow[0, 0, :, 0, 0].tolist() == [0, 4, 8, 13, 17, 22, 26, 31]  # linspace(0, 31, 8).long()
    assert fast is frames
    with pytest.raises(ConfigError, match="multiple of alpha"):
        tiny.pathways(torch.zeros(1, 3, 10, 8, 8))


def test_stem_and_fusion_match_an_explicit_computation(tiny):
    """Independent rebuild of s1 + s1_fuse from the state dict with plain conv / BN formulas."""
    sd = tiny.state_dict()

    def bn(x, prefix):
        shape = (1, -1, 1, 1, 1)
        scale = sd[prefix + ".weight"] / torch.sqrt(sd[prefix + ".running_var"] + 1e-5)
        return (x - sd[prefix + ".running_mean"].view(shape)) * scale.view(shape) + sd[prefix + ".bias"].view(shape)

    def stem(x, p, t_kernel):
        y = F.conv3d(x, sd[f"s1.pathway{p}_stem.conv.weight"], stride=(1, 2, 2), padding=(t_kernel // 2, 3, 3))
        y = torch.relu(bn(y, f"s1.pathway{p}_stem.bn"))
        return F.max_pool3d(y, (1, 3, 3), (1, 2, 2), (0, 1, 1))

    x = clip(b=1, t=16, size=32)
    slow_in = x[:, :, [0, 5, 10, 15]]  # linspace(0, 15, 4).long()
    slow, fast = stem(slow_in, 0, 1), stem(x, 1, 5)
    lateral = torch.relu(bn(F.conv3d(fast, sd["s1_fuse.conv_f2s.weight"], stride=(4, 1, 1), padding=(3, 0, 0)),
                            "s1_fuse.bn"))
    expected = torch.cat([slow, lateral], 1)
    with torch.no_grad():
        got, got_fast = tiny.s1_fuse(*tiny.s1(*tiny.pathways(x)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_fast, fast, rtol=1e-5, atol=1e-5)


def test_eval_is_deterministic_and_seeded():
    x = clip()
    a, b, c = build(tiny=True, seed=0), build(tiny=True, seed=0), build(tiny=True, seed=1)
    with torch.no_grad():
        assert torch.equal(a(x), a(x))
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), c(x))


def test_bf16_autocast_agrees_with_fp32(tiny):
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); ~20 conv/BN layers in sequence
    # accumulate a few of those in quadrature, so 3 % relative L2 error leaves headroom while a wrong
    # cast (e.g. BN statistics in bf16 over a whole stage) would show up as tens of percent.
    x = clip(b=2, t=8, size=64)
    with torch.no_grad():
        ref = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(x)
    assert low.dtype == torch.float32
    rel = (low - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


def test_unknown_arch_and_parameter_are_config_errors():
    with pytest.raises(ConfigError, match="unknown arch"):
        build(arch="r18_8x8")
    with pytest.raises(ConfigError, match="unknown parameter"):
        build(tiny=True, widht=8)
