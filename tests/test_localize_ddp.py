"""Data-parallel training (``localize.nproc``): two gloo processes train as one process does, resume
from a checkpoint, and through the CLI make a model under the same stage key; the CLI under torchrun
(2 processes) makes the model and record ``localize.nproc=2`` makes, and its rerun is a no-op."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

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
    """``one``: the reference run's losses and its model and EMA state dicts."""
    assert _losses(two_dir) == pytest.approx(one["losses"], rel=RTOL)
    for part in ("model", "ema"):
        ref = one[part]
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
    one = {"losses": _losses(tmp_path / "one"), "model": ref.model.state_dict(), "ema": ref.ema.state_dict()}
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


def _torchrun(cache, manifest, *extra):
    """The CLI on 2 processes under torchrun (a free port of its own: --standalone)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PIPELINE_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipeline",
            "--cache-dir", str(cache), "--json", "run", "train", "--stage", "localize", "--dataset", str(manifest),
            *extra]
    return subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=240)


def test_cli_under_torchrun_trains_as_nproc_and_reruns_as_a_noop(tmp_path):
    videos = make_videos(10, seed=5, length=(40, 70))
    manifest = _dataset(tmp_path, dict(list(videos.items())[:8]), dict(list(videos.items())[8:]),
                        "{preset: demo, embed_dim: 16, epochs: 1, warmup_epochs: 1, batch_size: 4, threads: 1}")
    ref_cache, cache = tmp_path / "cache", tmp_path / "torchrun"
    shutil.copytree(ref_cache, cache)  # the imported features, in both
    assert main(["--cache-dir", str(ref_cache), "run", "train", "--stage", "localize", "--dataset", str(manifest),
                 "--set", "localize.nproc=2"]) == 0
    (ref,) = (ref_cache / "localize").iterdir()

    proc = _torchrun(cache, manifest)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads(proc.stdout)["stages"]  # one JSON object: rank 0's alone
    assert [s["status"] for s in stages] == ["imported", "ran"]
    assert Path(stages[1]["dir"]).name == ref.name  # the key of localize.nproc=2
    done = Path(stages[1]["dir"])
    record, ref_record = (json.loads((d / "manifest.json").read_text()) for d in (done, ref))
    assert record["key"] == ref.name and record["result"]["epochs"] == ref_record["result"]["epochs"] == 2
    ref_state = torch.load(ref / "model.pt", weights_only=True)
    _assert_same({"losses": _losses(ref), **ref_state}, done, torch.load(done / "model.pt", weights_only=True))
    assert sorted(p.name for p in done.iterdir()) == sorted(p.name for p in ref.iterdir())

    before = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    proc = _torchrun(cache, manifest)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s["status"] for s in json.loads(proc.stdout)["stages"]] == ["imported", "cached"]
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == before
    assert [p.name for p in (cache / "localize").iterdir()] == [ref.name]

    # an error in rank 0's stage ends every process with its one line (none waits for ever)
    proc = _torchrun(cache, manifest, "--force", "--set", "localize.nproc=2")
    assert proc.returncode != 0 and not proc.stdout.strip()
    assert proc.stderr.count("pipeline: error: localize.nproc: 2 under torchrun, which started 2 processes") == 1


def test_bad_process_counts_are_named_before_training(tmp_path, monkeypatch):
    ds, extract_dir = write_dataset(tmp_path, make_videos(3, 0, length=(40, 70)), {})
    ctx = stage_context(tmp_path, "localize", "L1", {"preset": "demo", "batch_size": 4}, ds, {"extract": extract_dir})
    ctx.runtime["nproc"] = 4  # the batch is the 3 videos
    with pytest.raises(ConfigError, match=r"localize.nproc: 4 processes split each batch of 3 videos; at most that"):
        stage.train(ctx)
    ctx.runtime["nproc"] = 1
    monkeypatch.setenv("WORLD_SIZE", "4")  # the CLI under torchrun, 4 processes
    with pytest.raises(ConfigError, match=r"torchrun: 4 processes split each batch of 3 videos; at most that many"):
        stage.train(ctx)
    ctx.runtime["nproc"] = 2
    with pytest.raises(ConfigError, match=r"localize.nproc: 2 under torchrun, which started 4 processes already"):
        stage.train(ctx)
    assert not (ctx.out_dir / "config.json").exists()
