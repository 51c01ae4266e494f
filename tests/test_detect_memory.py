"""CycleACR's long-term memory as the detect stage feeds it: a bank of the head's actor features per
keyframe, built from the cached maps (per epoch in training, from the trained head at evaluation), acting
on a keyframe only through the keyframes of the same video within the head's window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detectors.config import detect_config
from detectors.data import Keyframe
from detectors.heads import build_head
from detectors.train import actor_bank, fit, predict
from pipeline.errors import ConfigError
from ava_fixtures import RandomMaps

C, H, W, T = 12, 4, 5, 6
WINDOW = (2, 2)  # seconds before / after (published: 30 / 30)
SMALL = dict(in_channels=C, dim_inner=8, temporal_len=T, num_classes=5, class_groups=(2, 2, 1), mlp_dim=16,
             memory_length=WINDOW, max_per_sec=3)


def keyframes():
    """v at 902, 903, 904 (neighbours of each other) and 920 (none within 2 s); w at 903 (another video)."""
    rng = np.random.default_rng(0)
    out = []
    for video, ts, n in (("v", 902, 2), ("v", 903, 3), ("v", 904, 1), ("v", 920, 2), ("w", 903, 2)):
        xy = rng.uniform(0, 0.5, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0.2, 0.45, (n, 2))], 1).astype(np.float32)
        targets = np.zeros((n, 5), np.float32)
        targets[np.arange(n), rng.integers(0, 2, n)] = 1
        targets[:, 2:] = rng.uniform(size=(n, 3)) < 0.4
        out.append(Keyframe(video, ts, boxes, targets, np.ones(n, np.float32)))
    return out


def head(**kw):
    torch.manual_seed(1)
    h = build_head("cycleacr", **{**SMALL, **kw}).eval()
    with torch.no_grad():  # the published init (zero output convs) would make every path a no-op
        for p in h.parameters():
            p.normal_(std=p[0].numel() ** -0.5 if p.dim() > 1 else 0.2)
    return h


def scores(h, kfs, source, memory, batch_size=2):
    return {key: s for key, (_, s) in predict(h, kfs, source, batch_size, memory=memory).items()}


@pytest.mark.parametrize("mask_padding", [False, True])
def test_memory_changes_predictions_only_through_neighbouring_keyframes(mask_padding):
    h, kfs = head(mask_padding=mask_padding), keyframes()
    source = RandomMaps([k.rid for k in kfs], (C, H, W, T))
    without = scores(h, kfs, source, memory=False)
    with_mem = scores(h, kfs, source, memory=True)
    # no neighbour of the same video within the window: the output is the memoryless one
    for lonely in (("v", 920), ("w", 903)):
        np.testing.assert_allclose(with_mem[lonely], without[lonely], rtol=0, atol=1e-6)
    for near in (("v", 902), ("v", 903), ("v", 904)):
        assert not np.allclose(with_mem[near], without[near], atol=1e-4), near
    # the bank comes from the cache, not from the batch: the batch size changes nothing
    for key, value in scores(h, kfs, source, memory=True, batch_size=5).items():
        np.testing.assert_allclose(value, with_mem[key], rtol=0, atol=1e-5)

    # a far keyframe's features (v 920, 16 s away) change nothing at v 902-904 or in video w
    far = scores(h, kfs, source.changed("v,0920"), memory=True)
    for key in (("v", 902), ("v", 903), ("v", 904), ("w", 903)):
        np.testing.assert_allclose(far[key], with_mem[key], rtol=0, atol=1e-6)
    # a neighbour's features (v 902) move v 903 and v 904 (1 and 2 s away), nothing else
    near = scores(h, kfs, source.changed("v,0902"), memory=True)
    for key in (("v", 903), ("v", 904)):
        assert not np.allclose(near[key], with_mem[key], atol=1e-4), key
    for key in (("v", 920), ("w", 903)):
        np.testing.assert_allclose(near[key], with_mem[key], rtol=0, atol=1e-6)


def test_the_bank_holds_each_keyframes_actor_features_in_box_order():
    h, kfs = head(), keyframes()
    source = RandomMaps([k.rid for k in kfs], (C, H, W, T))
    bank = actor_bank(h, kfs, source, batch_size=2)
    assert set(bank) == {(k.video, k.timestamp) for k in kfs}
    assert all(bank[(k.video, k.timestamp)].shape == (len(k.boxes), 8) for k in kfs)
    alone = actor_bank(h, kfs[1:2], source, batch_size=1)[("v", 903)]  # same features whatever the batch
    torch.testing.assert_close(alone, bank[("v", 903)], rtol=0, atol=1e-5)
    assert h.training is False and not any(t.requires_grad for t in bank.values())


def test_training_feeds_the_memory_and_resumes_as_if_never_stopped(tmp_path):
    kfs = keyframes()
    source = RandomMaps([k.rid for k in kfs], (C, H, W, T))
    base = {"head": "cycleacr", "optimizer": "adamw", "lr": 1e-3, "epochs": 3, "batch_size": 2, "box_jitter": 0.05}

    def train(memory, out, **kw):
        cfg = detect_config({**base, "memory": memory})
        torch.manual_seed(0)
        h = build_head("cycleacr", **SMALL, dropout=0.1)
        fit(cfg, cfg.recipe(h.recipe, cfg.batch_size), h, kfs, source, tmp_path / out, log=lambda m: None, **kw)
        return h

    plain, remembered = train(False, "plain"), train(True, "memory")
    # the neighbours' features reach the training steps: the memory blocks learn otherwise
    key = "cycleacr_module.instance_interaction.m_blocks.0.out.weight"
    assert not torch.allclose(plain.state_dict()[key], remembered.state_dict()[key], atol=1e-5)
    train(True, "resumed", max_epochs=1)  # interrupted after one epoch
    resumed = train(True, "resumed")
    for name, value in remembered.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_memory_is_cycleacrs_only():
    assert detect_config({"head": "cycleacr", "memory": True}).memory
    with pytest.raises(ConfigError, match=r"^detect.memory: only cycleacr has a long-term memory \(head is acar\)$"):
        detect_config({"head": "acar", "memory": True})
