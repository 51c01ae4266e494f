"""VideoMAE / v2: public layouts load strictly, key maps agree, position tables and attention are right."""

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.checkpoints import mismatch_report
from extractors.registry import build_backbone
from extractors.videomae import VARIANTS, Attention, VideoMAE, VideoMAEConfig, build, position_table, \
    sinusoid_table
from pipeline.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"


def layout(name: str) -> dict[str, tuple[list[int], str]]:
    return json.loads((FIXTURES / name).read_text())["keys"]


def random_state_dict(keys: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    sizes = [torch.Size(shape).numel() for shape, _ in keys.values()]
    flat = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(seed)).mul_(0.02)
    out, offset = {}, 0
    for (name, (shape, _)), n in zip(keys.items(), sizes):
        out[name] = flat[offset:offset + n].view(shape)
        offset += n
    return out


def save(tmp_path: Path, obj, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


@functools.lru_cache
def reference_sinusoid(n_position: int, d_hid: int) -> torch.Tensor:
    """The published numpy formula (position / 10000^(2*(j//2)/d), sin on even, cos on odd channels),
    written out independently of the module under test."""
    j = np.arange(d_hid)
    angles = np.arange(n_position)[:, None] / np.power(10000, 2 * (j // 2) / d_hid)[None, :]
    angles[:, 0::2] = np.sin(angles[:, 0::2])
    angles[:, 1::2] = np.cos(angles[:, 1::2])
    return torch.tensor(angles, dtype=torch.float)


def to_mmaction2(state: dict[str, torch.Tensor], cfg: VideoMAEConfig) -> dict[str, torch.Tensor]:
    """What OpenTAD's convert_videomaev2.py + mmaction2's VisionTransformer state_dict() produce."""
    out = {}
    for key, value in state.items():
        key = key.replace("mlp.fc1", "mlp.layers.0.0").replace("mlp.fc2", "mlp.layers.1")
        key = key.replace("patch_embed.proj", "patch_embed.projection")
        out["backbone." + key] = value
    t, h, w = cfg.grid
    out["backbone.pos_embed"] = reference_sinusoid(t * h * w, cfg.embed_dim)[None]
    out["cls_head.fc_cls.weight"] = torch.zeros(400, cfg.embed_dim)
    out["cls_head.fc_cls.bias"] = torch.zeros(400)
    return out


@pytest.fixture(scope="module")
def tiny():
    return build(tiny=True, seed=0)


def clip(b=2, t=8, size=64, seed=1):
    return torch.randn(b, 3, t, size, size, generator=torch.Generator().manual_seed(seed))


def perturbed(model: VideoMAE, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state with every tensor moved (so zero-initialised biases are exercised too)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


def test_full_vit_b_loads_public_layout_strictly(tmp_path):
    state = random_state_dict(layout("videomae_v2_vit_b.json"))
    wrapped = {"module": {"encoder." + k: v for k, v in state.items()}, "epoch": 40}
    model = build(variant="vit_b", weights=save(tmp_path, wrapped))
    assert model.feature_dim == 768 and model.in_channels == 3
    (report,) = model.weight_reports
    assert report.format == "videomae" and sorted(report.dropped) == ["encoder.head.bias", "encoder.head.weight"]
    loaded = model.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.11.attn.q_bias", "blocks.3.mlp.fc2.weight", "fc_norm.bias"):
        assert torch.equal(loaded[key], state[key])


@pytest.mark.parametrize("variant,layout_name,dim", [("vit_g", "videomae_v2_vit_g.json", 1408),
                                                     ("vit_s", None, 384), ("vit_l", None, 1024),
                                                     ("vit_h", None, 1280)])
def test_published_variants_without_allocating(variant, layout_name, dim):
    with torch.device("meta"):
        model = VideoMAE(VideoMAEConfig(**VARIANTS[variant]))
    assert model.feature_dim == dim
    if layout_name:
        expected = {k: v.shape for k, v in model.state_dict().items()}
        public = {k: torch.empty(v[0], device="meta") for k, v in layout(layout_name).items()
                  if not k.startswith("head.")}
        assert mismatch_report(public, expected) == ([], [], [])
        assert model.blocks[0].mlp.fc1.weight.shape == (6144, 1408)


def test_mmaction2_naming_gives_the_same_outputs_as_native(tmp_path, tiny):
    native = perturbed(tiny)
    a = build(tiny=True, seed=3, weights=save(tmp_path, {"model": native}, "a.pth"))
    b = build(tiny=True, seed=4, weights=save(tmp_path, {"meta": {}, "state_dict": to_mmaction2(native, tiny.cfg)},
                                               "b.pth"))
    assert b.weight_reports[0].format == "mmaction2"
    x = clip()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a.forward_map(x), b.forward_map(x))


def test_mmaction2_learned_position_table_is_refused(tmp_path, tiny):
    state = to_mmaction2(dict(tiny.state_dict()), tiny.cfg)
    state["backbone.pos_embed"] = state["backbone.pos_embed"] + 0.1
    with pytest.raises(ConfigError, match="backbone.pos_embed is not the fixed sinusoid"):
        build(tiny=True, weights=save(tmp_path, {"state_dict": state}))


def test_mmaction2_position_table_of_another_native_size_is_refused(tmp_path, tiny):
    state = to_mmaction2(dict(tiny.state_dict()), VideoMAEConfig(**{**tiny.cfg.__dict__, "num_frames": 16}))
    with pytest.raises(ConfigError, match="has 128 positions but the model's native grid 4x4x4 has 64"):
        build(tiny=True, weights=save(tmp_path, {"state_dict": state}))


@pytest.mark.parametrize("change", ["rename", "shape"])
def test_one_wrong_key_fails_naming_it(tmp_path, tiny, change):
    state = dict(tiny.state_dict())
    if change == "rename":
        state["blocks.1.attn.k_bias"] = state.pop("blocks.1.attn.v_bias")
        expected = ["blocks.1.attn.k_bias", "blocks.1.attn.v_bias"]
    else:
        state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"][:, :, :, :14, :14]
        expected = ["patch_embed.proj.weight", "[64, 3, 2, 14, 14]"]
    with pytest.raises(ConfigError) as err:
        build(tiny=True, weights=save(tmp_path, {"model": state}))
    message = str(err.value)
    assert "\n" not in message and "nearest known layout: videomae" in message
    for text in expected:
        assert text in message


def test_sinusoid_matches_the_published_formula():
    assert torch.equal(sinusoid_table(1568, 768), reference_sinusoid(1568, 768))


def test_position_table_is_native_at_native_size_and_resampled_elsewhere():
    cfg = VideoMAEConfig(**VARIANTS["vit_b"])
    native = reference_sinusoid(1568, 768)
    for mode in ("resample", "recompute"):
        other = VideoMAEConfig(**VARIANTS["vit_b"], pos_mode=mode)
        assert torch.equal(position_table(other, (8, 14, 14)), native)
    # 8 frames at 224: tubelet i sits at native time 2i + 0.5 (half-pixel centres), space unchanged
    resampled = position_table(cfg, (4, 14, 14)).view(4, 14, 14, 768)
    grid = native.view(8, 14, 14, 768)
    for i in range(4):
        torch.testing.assert_close(resampled[i], (grid[2 * i] + grid[2 * i + 1]) / 2, rtol=0, atol=1e-6)
    recomputed = position_table(VideoMAEConfig(**VARIANTS["vit_b"], pos_mode="recompute"), (8, 16, 16))
    assert torch.equal(recomputed, reference_sinusoid(8 * 16 * 16, 768))


def test_attention_matches_an_explicit_computation():
    """Independent rebuild of one attention: q and v biases, no key bias, softmax(q k^T / sqrt(d)) v."""
    attn = Attention(64, 4)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(7))
    w = attn.qkv.weight
    q = x @ w[:64].T + attn.q_bias
    k = x @ w[64:128].T
    v = x @ w[128:].T + attn.v_bias
    heads = [slice(h * 16, (h + 1) * 16) for h in range(4)]
    out = torch.cat([torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(16), -1) @ v[..., s]
                     for s in heads], -1)
    expected = out @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-4)


def test_block_matches_an_explicit_computation(tiny):
    block = tiny.blocks[0]
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = x + block.attn(F.layer_norm(x, (64,), block.norm1.weight, block.norm1.bias, 1e-6))
        y = F.layer_norm(h, (64,), block.norm2.weight, block.norm2.bias, 1e-6)
        mlp = (y @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
        mlp = 0.5 * mlp * (1 + torch.erf(mlp / math.sqrt(2)))  # exact GELU
        expected = h + mlp @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_tiny_shapes_feature_counts_and_map(tiny):
    x = clip(b=3)
    with torch.no_grad():
        feats = tiny(x)
        fmap = tiny.forward_map(x)
        other = tiny(clip(b=1, t=16, size=96))  # another size and frame count: interpolated positions
    assert feats.shape == (3, 64) and feats.dtype == torch.float32
    assert fmap.shape == (3, 64, 4, 4, 4)  # (C, T/2, H/16, W/16)
    assert other.shape == (1, 64)
    torch.testing.assert_close(tiny.fc_norm(fmap.mean((2, 3, 4))), feats, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="multiples of tubelet"):
        tiny(clip(b=1, t=7))


def test_keyframe_map_drops_the_partial_patch_then_pools(tiny):
    x = clip(b=2, t=8, size=64)
    wide = torch.cat([x, x[..., :12]], dim=4)            # 64 x 76: 4 whole patches across, 12 columns over
    with torch.no_grad():
        fmap, context = tiny.forward_keyframe(wide)
        full = tiny.forward_map(wide[..., :64])
    torch.testing.assert_close(fmap, full.mean(2))
    torch.testing.assert_close(context, full.amax((3, 4)))
    assert fmap.shape == (2, 64, 4, 4) and context.shape == (2, 64, 4) and tiny.feature_stride == 16


def test_registry_builds_videomae():
    model = build_backbone("videomae", tiny=True)
    assert isinstance(model, VideoMAE) and not model.training


def test_eval_is_deterministic_and_seeded():
    x = clip(b=1)
    a, b, c = build(tiny=True, seed=0), build(tiny=True, seed=0), build(tiny=True, seed=1)
    with torch.no_grad():
        assert torch.equal(a(x), a(x))
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), c(x))


def test_bf16_autocast_agrees_with_fp32(tiny):
    # Linear layers run in bf16 (relative rounding 2^-9 ~ 2e-3); LayerNorm and softmax stay in fp32
    # under CPU autocast. Two blocks of ~6 rounded matmuls each accumulate well under 1 %; fc_norm
    # rescales to unit variance, so 2 % relative L2 error bounds it with headroom.
    x = clip(b=2)
    with torch.no_grad():
        ref = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(x)
    assert low.dtype == torch.float32
    rel = (low - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


def test_unknown_variant_and_parameter_are_config_errors():
    with pytest.raises(ConfigError, match="unknown variant"):
        build(variant="vit_xl")
    with pytest.raises(ConfigError, match="unknown parameter"):
        build(tiny=True, depht=3)
