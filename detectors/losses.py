"""The published training losses of the AVA heads and the matching test-time scores.

- ``bce`` (mmaction2 ``BBoxHeadAVA``): sigmoid BCE over all classes, averaged over the RoIs that have at
  least one positive label (RoIs without any are left out) and the classes.
- ``pose_softmax`` (ACAR-Net ``ava_pose_softmax_criterion``): softmax over the first ``num_pose`` classes
  (the pose classes, one per person), sigmoid over the rest, then BCE on the probabilities; test scores
  are the same probabilities.
- ``focal`` (CycleACR / AlphAction ``ActionLossComputation``): softmax focal loss on the pose group with
  the argmax of the pose labels as the single target, sigmoid focal losses (alpha off) averaged over the
  classes of the object and person-interaction groups; each group summed over boxes, divided by the
  number of boxes and weighted (1.2 / 49 / 17 for the 14 / 49 / 17 groups of the 80-class list).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# AVA action ids by group (1..80 list): pose 1-14, object manipulation 15-63, person interaction 64-80.
AVA_POSE_IDS = range(1, 15)
AVA_OBJECT_IDS = range(15, 64)


def ava_groups(label_ids: Iterable[int]) -> tuple[int, int, int]:
    """(pose, object, person) class counts of a label list in AVA order, e.g. (13, 32, 15) for the
    60-class evaluation list and (14, 49, 17) for all 80; the ids must be sorted by group."""
    ids = list(label_ids)
    groups = [0 if i in AVA_POSE_IDS else 1 if i in AVA_OBJECT_IDS else 2 for i in ids]
    if groups != sorted(groups):
        raise ValueError("label ids must list pose, then object, then person-interaction classes")
    return groups.count(0), groups.count(1), groups.count(2)


@dataclass(frozen=True)
class MultiLabelBCE:
    num_classes: int

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        keep = targets.sum(dim=1) > 0
        if not bool(keep.any()):
            return logits.sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits[keep], targets[keep].to(logits.dtype))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()


@dataclass(frozen=True)
class PoseSoftmaxBCE:
    num_classes: int
    num_pose: int = 13

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # BCE on the probabilities as published (a saturated probability costs the log floor of 100,
        # not the logit's size), in float32 at least and outside autocast, which refuses this op
        with torch.autocast(device_type=logits.device.type, enabled=False):
            probs = self.scores(logits.float() if logits.element_size() < 4 else logits).clamp(0, 1)
            return F.binary_cross_entropy(probs, targets.to(probs.dtype))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return pose_softmax_scores(logits, self.num_pose)


def pose_softmax_scores(logits: torch.Tensor, n_pose: int) -> torch.Tensor:
    """Softmax over the (mutually exclusive) pose classes, sigmoid over the rest."""
    return torch.cat([logits[:, :n_pose].softmax(dim=1), logits[:, n_pose:].sigmoid()], dim=1)


@dataclass(frozen=True)
class GroupedFocal:
    num_classes: int
    class_groups: tuple[int, int, int] = (14, 49, 17)
    loss_weights: tuple[float, float, float] = (1.2, 49.0, 17.0)
    gamma: float = 2.0

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n_pose, n_obj, _ = self.class_groups
        boxes = max(logits.shape[0], 1)
        targets = targets.to(logits.dtype)
        total = logits.new_zeros(())
        if n_pose:
            pose_logits = logits[:, :n_pose]
            label = targets[:, :n_pose].argmax(dim=1)
            log_pt = pose_logits.log_softmax(dim=1).gather(1, label[:, None])[:, 0]
            pose = -log_pt * (1 - log_pt.exp()) ** self.gamma
            total = total + self.loss_weights[0] * pose.sum() / boxes
        for weight, lo, hi in ((self.loss_weights[1], n_pose, n_pose + n_obj),
                               (self.loss_weights[2], n_pose + n_obj, self.num_classes)):
            if hi > lo:
                x, t = logits[:, lo:hi], targets[:, lo:hi]
                p = x.sigmoid()
                p_t = p * t + (1 - p) * (1 - t)
                focal = F.binary_cross_entropy_with_logits(x, t, reduction="none") * (1 - p_t) ** self.gamma
                total = total + weight * focal.mean(dim=1).sum() / boxes
        return total

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return pose_softmax_scores(logits, self.class_groups[0])


def build_loss(name: str, *, num_classes: int, num_pose: int = 0, class_groups: tuple[int, ...] = (),
               loss_weights: tuple[float, ...] = (), gamma: float = 2.0):
    """``bce`` | ``pose_softmax`` (``num_pose`` leading pose classes) | ``focal`` (``class_groups`` sizes
    pose/object/person summing to ``num_classes``; weights default to 1.2 and the two group sizes, the
    published rule)."""
    if name == "bce":
        return MultiLabelBCE(num_classes)
    if name == "pose_softmax":
        if not 0 < num_pose < num_classes:
            raise ValueError(f"pose_softmax loss: num_pose must be in 1..{num_classes - 1}, got {num_pose}")
        return PoseSoftmaxBCE(num_classes, num_pose)
    if name == "focal":
        groups = tuple(class_groups)
        if len(groups) != 3 or sum(groups) != num_classes:
            raise ValueError(f"focal loss: class_groups must be 3 sizes summing to {num_classes}, got {groups}")
        weights = tuple(loss_weights) or (1.2, float(groups[1]), float(groups[2]))
        if len(weights) != 3:
            raise ValueError(f"focal loss: loss_weights must be 3 numbers, got {weights}")
        return GroupedFocal(num_classes, groups, weights, gamma)
    raise ValueError(f"loss must be one of bce, pose_softmax, focal; got {name!r}")
