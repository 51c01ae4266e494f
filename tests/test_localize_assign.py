"""Label assignment against a hand-worked example, and the training crops."""

from __future__ import annotations

import numpy as np
import torch

from localizers.assign import assign_targets
from localizers.data import VideoItem, random_crop
from localizers.points import make_points
from pipeline.timemap import TimeGrid


def test_assignment_hand_worked():
    # two levels: 8 points at stride 1 (range [0, 4]) and 4 at stride 2 (range [4, 100])
    points = make_points([8, 4], [1, 2], [(0, 4), (4, 100)])
    assert points[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 2, 4, 6]
    # video 0: A = [2, 5] class 1, B = [0, 7.5] class 0, C = [2, 5] class 2 (a duplicate of A)
    # video 1: no actions (one padded entry)
    segs = torch.tensor([[[2.0, 5.0], [0.0, 7.5], [2.0, 5.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0, 2], [0, 0, 0]])
    valid = torch.tensor([[True, True, True], [False, False, False]])
    cls, reg = assign_targets(points, segs, labels, valid, num_classes=3, radius=1.5)
    expected = torch.zeros(2, 12, 3)
    # stride 1: A/C centre 3.5 +- 1.5 -> (2, 5): t = 3, 4, farthest boundary 2 <= 4. B centre 3.75 +- 1.5 ->
    # (2.25, 5.25): t = 3 (reach 4.5 > 4, out of range), 4 (reach 4), 5 (reach 5 > 4); at t = 4 A/C are
    # shorter (3 < 7.5) and tie with each other: both labels.
    expected[0, 3, [1, 2]] = 1
    expected[0, 4, [1, 2]] = 1
    # stride 2: A/C reach 2 < 4 at t = 4: out of range. B centre 3.75 +- 3 -> (0.75, 6.75): t = 2, 4, 6 with
    # reach 5.5, 4, 6, all in [4, 100].
    expected[0, 9, 0] = expected[0, 10, 0] = expected[0, 11, 0] = 1
    assert torch.equal(cls, expected)
    assert reg[0, 3].tolist() == [1.0, 2.0] and reg[0, 4].tolist() == [2.0, 1.0]
    # distances divided by the stride
    assert reg[0, 9].tolist() == [1.0, 2.75] and reg[0, 10].tolist() == [2.0, 1.75] and reg[0, 11].tolist() == [3.0, 0.75]
    assert cls[1].sum() == 0


def _item(length, segments, labels=None):
    segments = np.asarray(segments, dtype=np.float32).reshape(-1, 2)
    labels = np.zeros(len(segments), dtype=np.int64) if labels is None else np.asarray(labels)
    return VideoItem("v", length, TimeGrid(fps=30, stride=4, clip_len=16), length * 4 / 30, segments, labels)


def test_crop_keeps_half_of_an_action_and_shifts_segments():
    rng = np.random.default_rng(0)
    item = _item(5000, [[100, 300], [2600, 2700], [4000, 4990]])
    for _ in range(50):
        crop = random_crop(item, 2304, 0.5, (0.9, 1.0), rng)
        assert crop.stop - crop.start == 2304 and 0 <= crop.start <= 5000 - 2304
        assert len(crop.labels) >= 1
        # cut to the window with the half-clip slack (offset 8 frames / stride 4 = 2 steps)
        assert (crop.segments[:, 0] >= -2).all() and (crop.segments[:, 1] <= 2304 + 2).all()
        originals = item.segments - crop.start
        for s in crop.segments:
            match = originals[(np.maximum(originals[:, 0], -2) == s[0]) & (np.minimum(originals[:, 1], 2306) == s[1])]
            assert len(match) == 1 and (s[1] - s[0]) >= 0.5 * (match[0, 1] - match[0, 0])


def test_short_videos_are_cropped_to_90_to_100_percent():
    rng = np.random.default_rng(1)
    item = _item(1000, [[100, 900]])
    sizes = [(c.stop - c.start) for c in (random_crop(item, 2304, 0.5, (0.9, 1.0), rng) for _ in range(100))]
    assert min(sizes) >= 900 and max(sizes) <= 1000 and len(set(sizes)) > 10
    whole = random_crop(item, 2304, 0.5, None, rng)
    assert (whole.start, whole.stop) == (0, 1000) and np.array_equal(whole.segments, item.segments)
