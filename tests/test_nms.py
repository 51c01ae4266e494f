import math
import random

import pytest
import torch

from localizers.nms import batched_nms


def _iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def _reference(segments, scores, labels, iou_threshold, sigma, method, min_score, max_num, voting_thresh=None):
    """Greedy NMS written plainly: one class at a time, one candidate at a time."""
    kept = []
    for c in sorted(set(labels)):
        pool = [[scores[i], i] for i in range(len(scores)) if labels[i] == c and scores[i] >= min_score]
        while pool:
            best = max(range(len(pool)), key=lambda k: (pool[k][0], -k))
            score, i = pool.pop(best)
            kept.append((score, i))
            survivors = []
            for s, j in pool:
                iou = _iou(segments[i], segments[j])
                if method == "soft":
                    s = s * math.exp(-iou * iou / sigma)
                    if s >= min_score:
                        survivors.append([s, j])
                elif iou < iou_threshold:
                    survivors.append([s, j])
            pool = survivors
    kept.sort(key=lambda t: -t[0])
    kept = kept[:max_num]
    out = []
    for score, i in kept:
        seg = segments[i]
        if voting_thresh is not None:
            w = [(scores[j], segments[j]) for j in range(len(scores))
                 if labels[j] == labels[i] and _iou(seg, segments[j]) >= voting_thresh]
            total = sum(x for x, _ in w)
            seg = [sum(x * s[0] for x, s in w) / total, sum(x * s[1] for x, s in w) / total]
        out.append((tuple(seg), score, labels[i]))
    return out


def _random_case(rng, n, n_classes, length=100.0):
    segments, scores, labels = [], [], []
    for _ in range(n):
        a = rng.uniform(0, length)
        segments.append([a, a + rng.uniform(0.5, 20.0)])
        scores.append(rng.random())
        labels.append(rng.randrange(n_classes))
    return segments, scores, labels


def _run(segments, scores, labels, **kw):
    s, sc, lab = batched_nms(
        torch.tensor(segments, dtype=torch.float64),
        torch.tensor(scores, dtype=torch.float64),
        torch.tensor(labels),
        **kw,
    )
    return [(tuple(x), y, z) for x, y, z in zip(s.tolist(), sc.tolist(), lab.tolist())]


@pytest.mark.parametrize("method", ["soft", "hard"])
@pytest.mark.parametrize("voting", [None, 0.7])
def test_matches_brute_force_on_random_candidates(method, voting):
    rng = random.Random(7)
    for trial in range(15):
        segments, scores, labels = _random_case(rng, rng.randrange(1, 60), rng.randrange(1, 5))
        kw = dict(iou_threshold=0.3, sigma=0.5, method=method, min_score=0.05, max_num=rng.choice([5, 200]),
                  voting_thresh=voting)
        ours = _run(segments, scores, labels, **kw)
        ref = _reference(segments, scores, labels, **kw)
        assert len(ours) == len(ref), trial
        for (s1, sc1, l1), (s2, sc2, l2) in zip(ours, ref):
            assert l1 == l2 and sc1 == pytest.approx(sc2, abs=1e-12)
            assert s1 == pytest.approx(s2, abs=1e-9)


def test_hard_nms_keeps_best_of_overlapping_and_other_classes():
    segments = [[0, 10], [1, 10], [0, 10], [20, 30]]
    ours = _run(segments, [0.9, 0.8, 0.7, 0.6], [0, 0, 1, 0], iou_threshold=0.5, sigma=0.5, method="hard",
                min_score=0.0, max_num=10)
    assert ours == [((0.0, 10.0), 0.9, 0), ((0.0, 10.0), 0.7, 1), ((20.0, 30.0), 0.6, 0)]


def test_soft_nms_decays_by_gaussian_of_tiou():
    ours = _run([[0, 10], [5, 10]], [1.0, 0.8], [3, 3], iou_threshold=0.1, sigma=0.5, method="soft",
                min_score=0.0, max_num=10)
    assert ours[1][1] == pytest.approx(0.8 * math.exp(-0.25 / 0.5))


def test_empty_input_and_degenerate_segments():
    s, sc, lab = batched_nms(torch.zeros((0, 2)), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5, 0.5)
    assert s.shape == (0, 2) and sc.shape == (0,) and lab.shape == (0,)
    ours = _run([[5, 5], [5, 5]], [0.9, 0.8], [0, 0], iou_threshold=0.5, sigma=0.5, method="hard",
                min_score=0.0, max_num=10, voting_thresh=0.5)
    assert [x[1] for x in ours] == [0.9, 0.8]
