"""The heads' published losses and test-time scores, and their training recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detectors.heads import build_head
from detectors.losses import ava_groups, build_loss
from detectors.recipes import Recipe

LABELMAP = Path("/work/shared/data/annotations/ava/ava_action_list_v2.1_for_activitynet_2018.pbtxt")


def batch(n=6, k=10, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=gen, dtype=torch.float64) * scale
    targets = (torch.rand(n, k, generator=gen) < 0.3).double()
    return logits, targets


def test_bce_leaves_out_rois_without_a_positive_label():
    logits, targets = batch()
    targets[1] = 0
    targets[4] = 0
    targets[0, 0] = 1
    keep = [0, 2, 3, 5]
    want = F.binary_cross_entropy_with_logits(logits[keep], targets[keep])
    got = build_loss("bce", num_classes=10).loss(logits, targets)
    assert torch.allclose(got, want)
    # no positive at all: a zero that still carries a graph
    zero = build_loss("bce", num_classes=10).loss(logits.requires_grad_(True), torch.zeros(6, 10))
    assert zero.item() == 0 and zero.requires_grad


@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_pose_softmax_equals_acar_criterion(scale):
    logits, targets = batch(scale=scale)
    probs = torch.cat([logits[:, :4].softmax(1), logits[:, 4:].sigmoid()], 1).clamp(0, 1)
    want = F.binary_cross_entropy(probs, targets)  # ACAR-Net ava_pose_softmax_criterion, logs floored at -100
    objective = build_loss("pose_softmax", num_classes=10, num_pose=4)
    assert torch.allclose(objective.loss(logits, targets), want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(objective.scores(logits), probs)


def test_grouped_focal_equals_alphaction_losses():
    logits, targets = batch(n=7)
    groups, weights = (3, 4, 3), (1.2, 4.0, 3.0)

    def sigmoid_focal(x, t):  # alphaction SigmoidFocalLoss(gamma 2, alpha -1, reduction none)
        p = x.sigmoid()
        p_t = p * t + (1 - p) * (1 - t)
        return F.binary_cross_entropy_with_logits(x, t, reduction="none") * (1 - p_t) ** 2

    label = targets[:, :3].argmax(1)  # rows without a pose label fall on class 0, as published
    p_t = logits[:, :3].softmax(1)[torch.arange(7), label]
    pose = (F.cross_entropy(logits[:, :3], label, reduction="none") * (1 - p_t) ** 2).sum() / 7
    obj = sigmoid_focal(logits[:, 3:7], targets[:, 3:7]).mean(1).sum() / 7
    person = sigmoid_focal(logits[:, 7:], targets[:, 7:]).mean(1).sum() / 7
    want = 1.2 * pose + 4.0 * obj + 3.0 * person
    objective = build_loss("focal", num_classes=10, class_groups=groups)
    assert objective.loss_weights == weights  # default weights: 1.2 and the group sizes
    assert torch.allclose(objective.loss(logits, targets), want)
    scores = objective.scores(logits)
    assert torch.allclose(scores[:, :3].sum(1), torch.ones(7, dtype=torch.float64))


def test_class_groups_of_the_real_label_lists():
    ids = [int(line.split(":")[1]) for line in LABELMAP.read_text().splitlines()
           if line.strip().startswith(("id:", "label_id:"))]
    assert len(ids) == 60
    assert ava_groups(ids) == (13, 32, 15)
    assert ava_groups(range(1, 81)) == (14, 49, 17)
    with pytest.raises(ValueError, match="pose, then object"):
        ava_groups([70, 3])


def test_bad_loss_settings_are_refused():
    with pytest.raises(ValueError, match="num_pose"):
        build_loss("pose_softmax", num_classes=10, num_pose=0)
    with pytest.raises(ValueError, match="summing to 10"):
        build_loss("focal", num_classes=10, class_groups=(3, 3, 3))
    with pytest.raises(ValueError, match="loss must be one of"):
        build_loss("hinge", num_classes=10)


def test_each_head_has_its_published_loss_by_default():
    kw = dict(in_channels=8)
    assert type(build_head("roi_linear", **kw).objective).__name__ == "MultiLabelBCE"
    assert type(build_head("acrn", hidden=8, **kw).objective).__name__ == "MultiLabelBCE"
    acar = build_head("acar", reduce_dim=8, hidden_dim=8, **kw)
    assert (type(acar.objective).__name__, acar.objective.num_pose) == ("PoseSoftmaxBCE", 13)
    cyc = build_head("cycleacr", dim_inner=8, **kw).objective
    assert (type(cyc).__name__, cyc.class_groups, cyc.loss_weights) == ("GroupedFocal", (14, 49, 17), (1.2, 49.0, 17.0))
    # the ACAR variant as an option of the baseline
    assert type(build_head("roi_linear", loss="pose_softmax", **kw).objective).__name__ == "PoseSoftmaxBCE"


def test_recipe_schedules():
    acar = build_head("acar", reduce_dim=8, hidden_dim=8, in_channels=8).recipe
    assert acar.lr_factor(0.0) == pytest.approx(0.125)          # 0.008 / 0.064
    assert acar.lr_factor(1.0) == 1.0
    assert acar.lr_factor(5.7) == pytest.approx(0.1)
    assert acar.lr_factor(5.9) == pytest.approx(0.01)
    assert acar.scaled(8).lr == pytest.approx(0.016)
    acrn = build_head("acrn", hidden=8, in_channels=8).recipe
    assert acrn.lr_factor(1.0) == pytest.approx(0.55)
    assert acrn.lr_factor(6.0) == pytest.approx(0.5)              # half way through the cosine
    assert acrn.lr_factor(10.0) == pytest.approx(0.0, abs=1e-12)
    cyc = build_head("cycleacr", dim_inner=8, in_channels=8).recipe
    epoch_iters = 235 * 897 / 32
    assert cyc.epochs * epoch_iters == pytest.approx(50_000)
    assert cyc.lr_factor(35_000 / epoch_iters) == pytest.approx(0.1)
    with pytest.raises(Exception):
        cyc.lr = 1.0  # frozen


def test_cycleacr_param_groups_follow_the_published_factors():
    head = build_head("cycleacr", dim_inner=8, in_channels=8, mlp_dim=8, num_classes=80)
    groups = head.recipe.param_groups(head)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(head.named_parameters())
    base, wd = head.recipe.lr, head.recipe.weight_decay
    assert by_param[id(named["fc1.weight"])] == (base, wd)
    assert by_param[id(named["fc1.bias"])] == (2 * base, 0.0)
    assert by_param[id(named["cycleacr_module.actor_dim_reduce.weight"])] == (10 * base, wd)
    assert by_param[id(named["cycleacr_module.actor_dim_reduce.bias"])] == pytest.approx((20 * base, 0.0))
    pos = "cycleacr_module.cycle_modeling.local_temporal_position"
    assert by_param[id(named[pos])] == (10 * base, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(named)
    assert math.isclose(sum(by_param[id(named["fc1.weight"])]), base + wd)
    assert isinstance(head.recipe, Recipe)
