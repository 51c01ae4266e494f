"""A training batch of unequal lengths split into parts (one optimizer step accumulated over them, so no
part computes on padding): which batches split, and that the split trains as the padded batch does, in
one process and in two."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from localize_synthetic import make_videos
from localizers import train
from localizers.config import PRESETS
from localizers.data import ArraySource
from localizers.train import fit, length_parts
from test_localize_ddp import _assert_same, _losses, _two_processes
from test_localize_train import items_of, small_config


def test_batches_split_where_padding_outweighs_a_parts_overhead():
    thumos = PRESETS["thumos_i3d"].with_dims(2048, 20).model
    assert length_parts([2304, 1000], thumos) == [[0], [1]]
    assert length_parts([2304, 2290], thumos) == [[0, 1]]  # both padded to 2304
    assert length_parts([1000, 2304, 1010, 300], thumos) == [[1], [0, 2], [3]]
    assert length_parts([2304] * 4, thumos) == [[0, 1, 2, 3]]
    # the demo's tiny model: a part's fixed overhead costs more than the padding it would save
    demo = PRESETS["demo"].with_dims(256, 4).model
    assert length_parts([250, 60, 200, 70], demo) == [[0, 1, 2, 3]]


def _setup(monkeypatch, length, max_seq_len):
    """``seen``: every batch's parts."""
    videos = make_videos(12, 3, length=length)
    cfg = small_config(epochs=1, warmup_epochs=1, batch_size=4)
    cfg = replace(cfg, model=replace(cfg.model, max_seq_len=max_seq_len))
    seen = []

    def recorded(lengths, mc):
        seen.append(length_parts(lengths, mc))
        return seen[-1]

    monkeypatch.setattr(train, "length_parts", recorded)
    return cfg, items_of(videos), ArraySource({vid: f for vid, (f, _) in videos.items()}), seen


@pytest.mark.usefixtures("one_thread")
def test_split_batches_train_as_padded_ones(tmp_path, monkeypatch):
    cfg, items, source, seen = _setup(monkeypatch, (40, 250), 256)
    cfg = replace(cfg, model=replace(cfg.model, embed_dim=16))
    monkeypatch.setattr(train, "PART_OVERHEAD_MACS", 0.0)  # split wherever padding is saved
    split = fit(cfg, items, source, tmp_path / "split", log=lambda m: None)
    assert sum(len(p) > 1 for p in seen) >= 3 and len(seen) == 6
    monkeypatch.setattr(train, "PART_OVERHEAD_MACS", float("inf"))  # never split
    padded = fit(cfg, items, source, tmp_path / "padded", log=lambda m: None)
    assert all(len(p) == 1 for p in seen[6:])
    # the same steps up to float summation order (see test_localize_ddp for why these tolerances)
    _assert_same({"losses": _losses(tmp_path / "padded"), "model": padded.model.state_dict(),
                  "ema": padded.ema.state_dict()}, tmp_path / "split",
                 {"model": split.model.state_dict(), "ema": split.ema.state_dict()})


def test_two_processes_split_batches_as_one_process_does(tmp_path, monkeypatch):
    """Videos of 100-2500 steps at width 64: their batches split with the default overhead, in the
    spawned processes as here. Each process sums its share's parts before DDP reduces, and the positives
    are counted over both."""
    cfg, items, source, seen = _setup(monkeypatch, (100, 2500), 2560)
    torch.set_num_threads(1)
    ref = fit(cfg, items, source, tmp_path / "one", log=lambda m: None)
    assert sum(len(p) > 1 for p in seen) >= 2
    state = _two_processes(cfg, items, source, tmp_path / "two")
    _assert_same({"losses": _losses(tmp_path / "one"), "model": ref.model.state_dict(),
                  "ema": ref.ema.state_dict()}, tmp_path / "two", state)
