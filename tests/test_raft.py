"""RAFT: the published layouts (princeton-vl with its ``module.`` prefix, torchvision's raft_large) load
strictly through the project's loader, a corrupted copy is refused by name, the two namings give the
same network, and the pieces (correlation lookup, convex upsampling, padding) behave as specified."""

from pathlib import Path

import pytest
import torch
from layout_fixtures import layout, public_state_dict

from extractors import raft
from pipeline.checkpoints import load_state_dict_checked
from pipeline.errors import ConfigError

THINGS, SMALL, TV = "raft_princeton_things.json", "raft_princeton_small.json", "raft_torchvision_large.json"


@pytest.fixture(scope="module")
def large():
    return raft.build("large")


def load(model, sd, target="raft large"):
    return load_state_dict_checked(model, sd, raft.FORMATS, source="ck.pth", target=target)


def test_parameter_counts_are_the_published_ones(large):
    """RAFT: 5.3 M parameters, RAFT-S: 1.0 M (paper, Table 'parameters')."""
    assert sum(p.numel() for p in large.parameters()) == 5_257_536
    assert sum(p.numel() for p in raft.build("small").parameters()) == 990_162


@pytest.mark.parametrize("name,arch,fmt", [(THINGS, "large", "princeton-vl/RAFT"),
                                           (SMALL, "small", "princeton-vl/RAFT"),
                                           (TV, "large", "torchvision raft_large")])
def test_published_layouts_load_strictly_from_a_file(tmp_path: Path, name, arch, fmt):
    sd = public_state_dict(name, counters=True)
    path = tmp_path / "ck.pth"
    torch.save(sd, path)
    model = raft.build(arch, weights=path)
    (report,) = model.weight_reports
    assert report.format == fmt and report.skipped == () and len(report.sha256) == 64
    state = model.state_dict()
    if name == TV:
        pairs = {"feature_encoder.convnormrelu.0.weight": "fnet.conv1.weight",
                 "context_encoder.layer2.0.downsample.1.running_var": "cnet.layer2.0.downsample.1.running_var",
                 "context_encoder.layer3.1.convnormrelu2.1.weight": "cnet.layer3.1.norm2.weight",
                 "context_encoder.conv.bias": "cnet.conv2.bias",
                 "update_block.motion_encoder.convcorr2.0.weight": "update_block.encoder.convc2.weight",
                 "update_block.motion_encoder.conv.0.bias": "update_block.encoder.conv.bias",
                 "update_block.recurrent_block.convgru2.convq.weight": "update_block.gru.convq2.weight",
                 "mask_predictor.conv.weight": "update_block.mask.2.weight"}
    else:
        assert all(k.startswith("module.") for k in sd)
        assert sorted(report.dropped) == sorted(k[len("module."):] for k in sd if ".norm3." in k or ".norm4." in k)
        pairs = {f"module.{k}": k for k in ("fnet.layer2.0.downsample.0.weight", "update_block.encoder.convf1.bias",
                                            "update_block.flow_head.conv2.weight")}
        if arch == "large":
            pairs["module.cnet.layer2.0.downsample.1.running_mean"] = "cnet.layer2.0.downsample.1.running_mean"
            pairs["module.update_block.gru.convz1.weight"] = "update_block.gru.convz1.weight"
    for public, ours in pairs.items():
        assert torch.equal(state[ours], sd[public]), public


def test_the_layouts_cover_every_tensor_of_the_model(large):
    """Every model tensor is in both layouts; princeton-vl has the strided blocks' norm alias on top."""
    ours = set(large.state_dict())
    princeton = {k[len("module."):] for k in layout(THINGS)}
    assert {k for k in princeton if ".norm3." not in k} == ours
    assert len(layout(TV)) == len(ours)


def test_a_corrupted_copy_is_refused_naming_the_keys(tmp_path: Path, large):
    sd = public_state_dict(THINGS)
    sd["module.update_block.gru.convr2.weight"] = torch.zeros(128, 384, 1, 5)    # (5, 1) transposed
    del sd["module.update_block.mask.2.bias"]
    sd["module.update_block.mask.3.bias"] = torch.zeros(576)
    path = tmp_path / "raft-things.pth"
    torch.save(sd, path)
    with pytest.raises(ConfigError) as err:
        raft.build("large", weights=path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: does not fit raft large (nearest known layout: princeton-vl/RAFT")
    assert "missing (1): update_block.mask.2.bias;" in msg
    assert "unexpected (1): update_block.mask.3.bias;" in msg
    assert "update_block.gru.convr2.weight checkpoint [128, 384, 1, 5] vs model [128, 384, 5, 1]" in msg
    assert "\n" not in msg


def test_missing_file_names_what_to_get_and_bad_settings_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"absent\.pth: checkpoint file not found; needed: raft-things\.pth"):
        raft.build("large", weights=tmp_path / "absent.pth")
    with pytest.raises(ConfigError, match="raft.arch"):
        raft.build("huge")
    with pytest.raises(ConfigError, match="raft.iters"):
        raft.build("tiny", iters=0)
    with pytest.raises(ConfigError, match="raft: 40x48 frames are too small for 4 correlation levels"):
        raft.build("small")(torch.zeros(1, 3, 40, 48), torch.zeros(1, 3, 40, 48))


def to_torchvision(key: str) -> str:
    """princeton-vl -> torchvision names, written out per module (the inverse of the loader's map)."""
    top, rest = key.split(".", 1)
    if top in ("fnet", "cnet"):
        enc = {"fnet": "feature_encoder", "cnet": "context_encoder"}[top]
        parts = rest.split(".")
        if parts[0] in ("conv1", "norm1"):
            return f"{enc}.convnormrelu.{0 if parts[0] == 'conv1' else 1}.{parts[1]}"
        if parts[0] == "conv2":
            return f"{enc}.conv.{parts[1]}"
        layer, block, name, *leaf = parts
        if name != "downsample":
            name = f"convnormrelu{name[-1]}.{0 if name.startswith('conv') else 1}"
        return ".".join([enc, layer, block, name, *leaf])
    module, name, leaf = rest.split(".", 2)
    if module == "encoder":
        new = {"convc1": "convcorr1.0", "convc2": "convcorr2.0", "convf1": "convflow1.0", "convf2": "convflow2.0",
               "conv": "conv.0"}[name]
        return f"update_block.motion_encoder.{new}.{leaf}"
    if module == "gru":
        return f"update_block.recurrent_block.convgru{name[-1]}.{name[:-1]}.{leaf}"
    if module == "mask":
        return f"mask_predictor.{'convrelu.0' if name == '0' else 'conv'}.{leaf}"
    return key


def test_princeton_and_torchvision_namings_give_the_same_flow():
    pv = public_state_dict(THINGS, seed=3)
    for k, v in pv.items():     # weights small enough that 3 iterations stay finite and informative
        if k.endswith("running_var"):
            v.fill_(1.0)
        elif ".norm" in k or ".downsample.1." in k:
            v.mul_(0.1).add_(1.0 if k.endswith("weight") else 0.0)
        else:
            v.mul_(0.02)
    bare = {k[len("module."):]: v for k, v in pv.items() if ".norm3." not in k}
    tv = {to_torchvision(k): v for k, v in bare.items()}
    assert set(tv) == {k for k in layout(TV) if not k.endswith("num_batches_tracked")}
    a, b = raft.RAFT("large", iters=3).eval(), raft.RAFT("large", iters=3).eval()
    assert load(a, pv)[0] == "princeton-vl/RAFT"
    fmt, _, skipped = load(b, tv)
    assert fmt == "torchvision raft_large" and skipped == []
    x1, x2 = torch.rand(1, 3, 64, 72) * 255, torch.rand(1, 3, 64, 72) * 255
    with torch.no_grad():
        out = a(x1, x2)
        torch.testing.assert_close(out, b(x1, x2))
    assert out.abs().max() > 0


def test_correlation_lookup_reads_the_pairs_around_the_estimate():
    """One level, radius 1, features one-hot per pixel: corr(p, q) = [p == q] / sqrt(C), so the window
    around coordinates x + d has its single 1/sqrt(C) at the offset -d; the reference orders the
    window samples (dy, dx)-transposed, i.e. column-major over the 3x3 window."""
    h, w = 4, 5
    c = h * w
    fmap = torch.eye(c).view(c, h, w).unsqueeze(0)
    pyr = raft.CorrPyramid(fmap, fmap, levels=1, radius=1)
    coords = raft._coords_grid(1, h, w, "cpu", torch.float32).clone()
    coords[:, 0] += 1.0                                   # look one pixel to the right
    window = pyr(coords)[0, :, 2, 2].view(3, 3)           # samples around (x=3, y=2)
    expected = torch.zeros(3, 3)
    expected[0, 1] = 1 / c ** 0.5                         # offset -1 on the axis the reference calls dy
    torch.testing.assert_close(window, expected)


def test_convex_upsampling_of_a_constant_flow_is_that_flow_times_8():
    flow = torch.full((1, 2, 3, 4), 0.5)
    flow[:, 1] = -0.25
    up = raft.convex_upsample(flow, torch.randn(1, 576, 3, 4))
    assert up.shape == (1, 2, 24, 32)
    # Interior cells mix 9 equal neighbours: exactly 8x; border cells also mix zero padding.
    torch.testing.assert_close(up[0, :, 8:16, 8:24], torch.stack([torch.full((8, 16), 4.0),
                                                                  torch.full((8, 16), -2.0)]))


def test_any_frame_size_is_padded_and_cropped_back():
    model = raft.build("tiny")
    x = torch.rand(3, 3, 37, 45) * 255
    with torch.no_grad():
        pairs = model(x[:-1], x[1:])
        seq = model.consecutive(x)
    assert pairs.shape == seq.shape == (2, 2, 37, 45)
    torch.testing.assert_close(pairs, seq)


def test_iterations_refine_and_are_configurable():
    model = raft.build("tiny", iters=2)
    x = torch.rand(2, 3, 32, 32) * 255
    with torch.no_grad():
        assert len(model.predictions(x[:1], x[1:])) == 2 and len(model.predictions(x[:1], x[1:], iters=5)) == 5
        torch.testing.assert_close(model(x[:1], x[1:]), model.predictions(x[:1], x[1:], iters=2)[-1])
