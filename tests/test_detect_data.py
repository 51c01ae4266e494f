"""The detect stage's config and data: one schema (the dataclasses) behind stages.yaml, proposals labelled
by their ground truth, batches of clips with different actor counts, box jitter on the cached map, and
training that resumes where it stopped."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from detectors.config import DetectConfig, DetectEvalConfig, detect_config
from detectors.data import Keyframe, MapSource, collate, jitter_boxes, training_keyframes
from detectors.heads import build_head
from detectors.train import fit
from pipeline.ava import AvaSplit, KeyframeBoxes, KeyframeTable
from pipeline.errors import ConfigError
from pipeline.stage_graph import load_stage_graph
from pipeline.store import create_store
from pipeline.store.loader import RecordReader

ROOT = Path(__file__).resolve().parents[1]


def test_stages_yaml_lists_the_dataclass_fields_with_their_defaults():
    graph = load_stage_graph(ROOT / "stages.yaml")
    for stage, cls in (("detect", DetectConfig), ("detect_eval", DetectEvalConfig)):
        assert dict(graph[stage].params) == {f.name: getattr(cls(), f.name) for f in fields(cls)}


def test_bad_values_name_the_param():
    with pytest.raises(ConfigError, match=r"detect.boxes: expected gt \| proposals, got 'pred'"):
        detect_config({"boxes": "pred"})
    with pytest.raises(ConfigError, match=r"detect.lr: must be > 0, got -1"):
        detect_config({"lr": -1})
    with pytest.raises(ConfigError, match="detect.batchsize: unknown parameter"):
        detect_config({"batchsize": 4})


def test_head_names_of_the_schema_are_the_registry():
    from detectors.config import HEAD_NAMES
    from detectors.heads import HEADS

    assert HEAD_NAMES == tuple(HEADS)


def _split(proposals: dict) -> AvaSplit:
    gt = KeyframeTable(stats=None)
    gt[("v", 902)] = KeyframeBoxes(np.array([[0.1, 0.1, 0.3, 0.5], [0.6, 0.2, 0.9, 0.8]], np.float32),
                                   ((1, 45), (4,)), (0, 1))
    props = KeyframeTable(stats=None)
    props.update(proposals)
    return AvaSplit(name="train", labelmap={1: "stand", 4: "walk", 45: "touch"}, gt=gt, proposals=props,
                    exclusions=set(), keyframes={"v": (902,)}, timestamp_offset_s=900)


def test_training_proposals_take_their_ground_truths_labels_and_the_ground_truth_is_added():
    props = np.array([[0.11, 0.1, 0.31, 0.5, 0.95],   # matches box 0
                      [0.0, 0.0, 0.05, 0.05, 0.97],   # a false positive: all-negative target
                      [0.6, 0.2, 0.9, 0.8, 0.5]], np.float32)  # below the threshold
    (kf,) = training_keyframes(_split({("v", 902): props}), {"v,0902"}, "proposals", 0.9, print)
    assert len(kf.boxes) == 4
    np.testing.assert_array_equal(kf.targets, [[1, 0, 1], [0, 1, 0], [1, 0, 1], [0, 0, 0]])
    (gt_only,) = training_keyframes(_split({("v", 902): props}), {"v,0902"}, "gt", 0.9, print)
    assert len(gt_only.boxes) == 2
    assert training_keyframes(_split({}), set(), "gt", 0.9, print) == []  # not in the store: skipped


def _store(tmp_path: Path, sizes: dict[str, tuple[int, int]], channels: int = 6) -> MapSource:
    attrs = {"index": "keyframe", "fields": {"map": ["C", "H", "W"], "context": ["C", "T"]},
             "feature_dim": channels, "feature_stride": 16}
    rng = np.random.default_rng(0)
    with create_store(tmp_path, "zarr", "float16", attrs) as store:
        for rid, (h, w) in sizes.items():
            store.write(rid, {"map": rng.normal(size=(channels, h, w)), "context": rng.normal(size=(channels, 4))},
                        {"frame_height": 16 * h, "frame_width": 16 * w})
    return MapSource(RecordReader(tmp_path), list(sizes))


def _keyframe(ts: int, n: int, rng) -> Keyframe:
    xy = rng.uniform(0, 0.5, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.4, (n, 2))], 1).astype(np.float32)
    targets = np.zeros((n, 3), np.float32)
    targets[np.arange(n), rng.integers(0, 3, n)] = 1
    return Keyframe("v", ts, boxes, targets, np.ones(n, np.float32))


def test_a_batch_holds_clips_with_different_actor_counts_and_map_sizes(tmp_path):
    source = _store(tmp_path, {"v,0902": (4, 6), "v,0903": (5, 4), "v,0904": (4, 6)})
    rng = np.random.default_rng(1)
    kfs = [_keyframe(902, 1, rng), _keyframe(903, 5, rng), _keyframe(904, 3, rng)]
    batch, targets = collate(kfs, source)
    assert batch.maps.shape == (3, 6, 5, 6) and targets.shape == (9, 3)
    assert batch.clip_index.tolist() == [0, 1, 1, 1, 1, 1, 2, 2, 2]
    assert batch.image_size.tolist() == [[64, 96], [80, 64], [64, 96]]
    assert torch.equal(batch.maps[1, :, :, 4:], torch.zeros(6, 5, 2))  # padding, outside clip 1's image
    np.testing.assert_array_equal(batch.rois[:, 1:].numpy(), np.concatenate([k.boxes for k in kfs]))


def test_jitter_moves_each_side_within_its_fraction_and_keeps_boxes_valid():
    boxes = torch.tensor([[0.2, 0.2, 0.6, 0.4], [0.0, 0.9, 0.1, 1.0]]).repeat(500, 1)
    moved = jitter_boxes(boxes, 0.1, torch.Generator().manual_seed(0))
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    assert ((moved - boxes).abs() <= 0.1 * wh + 1e-6).all()
    assert (moved >= 0).all() and (moved <= 1).all()
    assert ((moved[:, 2:] > moved[:, :2]).all()) and not torch.equal(moved, boxes)


def test_training_resumes_after_an_interruption_as_if_never_stopped(tmp_path):
    sizes = {f"v,{902 + i:04d}": (4, 4) for i in range(6)}
    source = _store(tmp_path / "store", sizes)
    rng = np.random.default_rng(2)
    kfs = [_keyframe(902 + i, 1 + i % 3, rng) for i in range(6)]
    cfg = detect_config({"epochs": 3, "batch_size": 2, "optimizer": "adamw", "lr": 0.01})

    def head():  # with dropout: the torch RNG must resume too
        torch.manual_seed(0)
        return build_head("roi_linear", in_channels=6, num_classes=3, num_pose=0, dropout=0.5)

    full = head()
    recipe = cfg.recipe(full.recipe, cfg.batch_size)
    fit(cfg, recipe, full, kfs, source, tmp_path / "a", log=lambda m: None)
    fit(cfg, recipe, head(), kfs, source, tmp_path / "b", log=lambda m: None, max_epochs=1)  # interrupted
    resumed = head()
    assert len(fit(cfg, recipe, resumed, kfs, source, tmp_path / "b", log=lambda m: None)) == 2
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)
    other = detect_config({**cfg.to_json(), "lr": 0.02})
    with pytest.raises(ValueError, match="checkpoint of another configuration"):
        fit(other, other.recipe(full.recipe, 2), head(), kfs, source, tmp_path / "b", log=lambda m: None)


def test_overrides_keep_the_recipe_consistent():
    cyc = build_head("cycleacr", dim_inner=8, in_channels=8, mlp_dim=8, num_classes=3, class_groups=(1, 1, 1))
    published = cyc.recipe.scaled(8)
    # the published length rounded to whole epochs, the milestones moved with it: what the loop runs
    whole = detect_config({}).recipe(cyc.recipe, 8)
    assert whole.epochs == round(published.epochs) != published.epochs
    assert whole.milestones == pytest.approx(tuple(m * whole.epochs / published.epochs for m in published.milestones))
    assert dataclasses.replace(whole, epochs=published.epochs, milestones=published.milestones) == published
    # another optimiser: the published per-parameter lr factors (module x10, bias x2 for SGD) are dropped
    adamw = detect_config({"optimizer": "adamw", "lr": 0.003}).recipe(cyc.recipe, 8)
    assert adamw.lr_factors == () and adamw.no_decay == published.no_decay
    assert {g["lr"] for g in adamw.param_groups(cyc)} == {0.003}
    assert detect_config({"lr": 0.003}).recipe(cyc.recipe, 8).lr_factors == published.lr_factors
    # a new length moves the step milestones in proportion
    acar = build_head("acar", reduce_dim=8, hidden_dim=8, in_channels=8).recipe
    longer = detect_config({"epochs": 20}).recipe(acar, 8)
    assert longer.milestones == pytest.approx((5.6 * 20 / 6, 5.8 * 20 / 6))
    assert longer.lr_factor(18.0) == 1.0 and longer.lr_factor(19.5) == pytest.approx(0.01)
