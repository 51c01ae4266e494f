"""Data-parallel training (``localize.nproc``): two gloo processes train as one process does, resume
from a checkpoint, and through the CLI make a model under the same stage key."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import torch

from localize_synthetic import make_videos, stage_context, write_dataset
from localizers import stage
from localizers.data import ArraySource
from localizers.train import fit
from pipeline.cli import main
from pipeline.errors import ConfigError
from test_localize_train import items_of, small_config
from test_localize_workflow import _dataset

# Two processes sum the batch's gradients in another order than one process does (float32, ~1e-7
# relative per step); Adam scales each step by 1/sqrt(v), which keeps these differences at that size for
# a few steps. Measured here after 6 steps: per-epoch losses agree to ~1e-7 relative, weights to < 1e-6
# absolute; 1e-5 leaves room across machines, while a wrong loss normaliser or a batch counted twice moves
# the first epoch's loss by far more. Except the attention's key biases (key.bias, key_norm.bias): a
# constant added to every key shifts each query's logits alike and softmax ignores it, so their exact
# gradient is 0 and what they get is rounding noise, which Adam's 1/sqrt(v) turns into steps as large as
# real ones (up to 2.5e-5 here): both runs must only leave them at noise level.
RTOL, ATOL = 1e-5, 1e-5
NOISE = 1e-4  # the other weights are ~0.1 and move by up to the lr (1e-3) a step


def _losses(path):
    with open(path / "train_log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _setup():
    videos = make_videos(12, 3, length=(40, 70))
    items = items_of(videos)
    source = ArraySource({vid: f for vid, (f, _) in videos.items()})
    # adaptive regression weight: the all-reduced losses are needed for it too
    cfg = small_config(epochs=1, warmup_epochs=1, batch_size=4, reg_loss_weight=0.0)
    return replace(cfg, model=replace(cfg.model, embed_dim=16)), items, source


def _two_processes(cfg, items, source, out):
    stage._launch(2, torch.device("cpu"), 1, False, (cfg, items, source, out, None, ["a", "b", "c"]))
    return torch.load(out / "model.pt", weights_only=True)


def _assert_same(one, two_dir, state):
    assert _losses(two_dir) == pytest.approx(one["losses"], rel=RTOL)
    for part in ("model", "ema"):
        ref = one[part].state_dict()
        assert set(state[part]) == set(ref)
        for k, v in ref.items():
            if k.endswith(("attn.key.bias", "attn.key_norm.bias")):
                assert v.abs().max() < NOISE and state[part][k].abs().max() < NOISE, f"{part}.{k}"
                continue
            torch.testing.assert_close(state[part][k], v, rtol=RTOL, atol=ATOL, msg=f"{part}.{k}")


def test_two_processes_train_as_one_and_resume(tmp_path):
    cfg, items, source = _setup()
    torch.set_num_threads(1)
    ref = fit(cfg, items, source, tmp_path / "one", log=lambda m: None)
    one = {"losses": _losses(tmp_path / "one"), "model": ref.model, "ema": ref.ema}
    assert len(one["losses"]) == 2 and ref.steps == 6
    state = _two_processes(cfg, items, source, tmp_path / "two")
    _assert_same(one, tmp_path / "two", state)
    assert state["steps"] == 6
    # interrupted after epoch 1 in one process, resumed in two: all of them start from the checkpoint
    fit(cfg, items, source, tmp_path / "resumed", log=lambda m: None, max_epochs=1)
    _assert_same(one, tmp_path / "resumed", _two_processes(cfg, items, source, tmp_path / "resumed"))


def test_cli_nproc_two_makes_the_model_under_the_same_key(tmp_path, capsys):
    videos = make_videos(10, seed=5, length=(40, 70))
    train = dict(list(videos.items())[:8])
    test = dict(list(videos.items())[8:])
    manifest = _dataset(tmp_path, train, test, "{preset: demo, embed_dim: 16, epochs: 1, warmup_epochs: 1, "
                                               "batch_size: 4, threads: 1}")
    cache = tmp_path / "cache"
    assert main(["--cache-dir", str(cache), "run", "train", "--stage", "localize", "--dataset", str(manifest),
                 "--set", "localize.nproc=2"]) == 0
    (key,) = [p.name for p in (cache / "localize").iterdir()]
    assert (cache / "localize" / key / "model.pt").is_file()
    assert "2 processes" in capsys.readouterr().err
    assert main(["--cache-dir", str(cache), "run", "train", "--stage", "localize", "--dataset", str(manifest),
                 "--set", "localize.nproc=1"]) == 0
    assert [p.name for p in (cache / "localize").iterdir()] == [key]  # same key: the run found it done


def test_bad_process_counts_are_named_before_training(tmp_path, monkeypatch):
    ds, extract_dir = write_dataset(tmp_path, make_videos(3, 0, length=(40, 70)), {})
    ctx = stage_context(tmp_path, "localize", "L1", {"preset": "demo", "batch_size": 4}, ds, {"extract": extract_dir})
    ctx.runtime["nproc"] = 4  # the batch is the 3 videos
    with pytest.raises(ConfigError, match=r"localize.nproc: 4 processes split each batch of 3 videos; at most that"):
        stage.train(ctx)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"the CLI runs under torchrun \(WORLD_SIZE=2\); run it once and set"):
        stage.train(ctx)
    assert not (ctx.out_dir / "config.json").exists()
