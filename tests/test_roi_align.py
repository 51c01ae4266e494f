"""RoIAlign against hand-computed bilinear values, a scalar transcription of torchvision's kernel, and
torchvision itself where it imports (not on the CPU CI machine)."""

from __future__ import annotations

import math

import pytest
import torch

from detectors.roi_align import actor_vector, roi_align


def ramp(height=4, width=5, batch=1):
    """f[b, 0, y, x] = 100 b + 10 y + x: bilinear sampling of it is exact inside the map."""
    y = torch.arange(height, dtype=torch.float64)[:, None]
    x = torch.arange(width, dtype=torch.float64)[None, :]
    return torch.stack([100 * b + 10 * y + x for b in range(batch)])[:, None]


def one(box, out, **kw):
    return roi_align(ramp(), torch.tensor([[0.0, *box]], dtype=torch.float64), out, **kw)[0, 0]


def test_legacy_mode_hand_values():
    # box 1..3, 2 bins of 1 cell, 2 samples per bin at +0.25/+0.75: bin means 1.5 and 2.5
    got = one((1, 1, 3, 3), 2, sampling_ratio=2, aligned=False)
    assert torch.allclose(got, torch.tensor([[16.5, 17.5], [26.5, 27.5]], dtype=torch.float64))


def test_aligned_mode_hand_values():
    # the same box shifted by half a cell: bin means 1.0 and 2.0
    got = one((1, 1, 3, 3), 2, sampling_ratio=2, aligned=True)
    assert torch.allclose(got, torch.tensor([[11.0, 12.0], [21.0, 22.0]], dtype=torch.float64))


def test_adaptive_sampling_uses_ceil_of_bin_size():
    # roi 3 cells, 2 bins of 1.5: ceil(1.5) = 2 samples per bin at 0.375, 1.125 | 1.875, 2.625
    got = one((0, 0, 3, 3), 2, sampling_ratio=0, aligned=False)
    means = (0.75, 2.25)
    want = torch.tensor([[10 * my + mx for mx in means] for my in means], dtype=torch.float64)
    assert torch.allclose(got, want)


def test_samples_left_of_the_map_clamp_and_beyond_it_vanish():
    # aligned: box 0..1 starts at -0.5; samples at -0.25 (clamped to 0) and 0.25 on both axes
    assert one((0, 0, 1, 1), 1, sampling_ratio=2, aligned=True).item() == pytest.approx(1.375)
    # rows: sample y=4.0 (== H, kept, snapped to row 3) and y=5.0 (> H, weight 0); x samples 0.25, 0.75
    got = one((0, 3.5, 1, 5.5), 1, sampling_ratio=2, aligned=False).item()
    assert got == pytest.approx((30.25 + 30.75) / 4)


def test_legacy_mode_forces_one_cell_and_aligned_mode_returns_zero_for_empty_boxes():
    assert one((1, 1, 1, 1), 1, sampling_ratio=-1, aligned=False).item() == pytest.approx(16.5)
    assert one((1, 1, 1, 1), 1, sampling_ratio=-1, aligned=True).item() == 0.0


def test_spatial_scale_and_batch_index():
    feats = ramp(batch=2)
    rois = torch.tensor([[1.0, 16, 16, 48, 48], [0.0, 16, 16, 48, 48]], dtype=torch.float64)
    got = roi_align(feats, rois, 2, spatial_scale=1 / 16, sampling_ratio=2, aligned=False)
    assert torch.allclose(got[1, 0], torch.tensor([[16.5, 17.5], [26.5, 27.5]], dtype=torch.float64))
    assert torch.allclose(got[0, 0] - got[1, 0], torch.full((2, 2), 100.0, dtype=torch.float64))
    assert roi_align(feats, rois[:0], (7, 8)).shape == (0, 1, 7, 8)


def reference(feats, rois, out, scale, ratio, aligned):
    """Scalar transcription of torchvision's roi_align_forward_kernel_impl (box by box, sample by sample)."""
    oh, ow = out
    _, ch, height, width = feats.shape
    result = torch.zeros(len(rois), ch, oh, ow, dtype=feats.dtype)

    def bilinear(img, y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return torch.zeros(ch, dtype=feats.dtype)
        y, x = max(y, 0.0), max(x, 0.0)
        yl, xl = int(y), int(x)
        if yl >= height - 1:
            yh = yl = height - 1
            y = float(yl)
        else:
            yh = yl + 1
        if xl >= width - 1:
            xh = xl = width - 1
            x = float(xl)
        else:
            xh = xl + 1
        ly, lx = y - yl, x - xl
        hy, hx = 1 - ly, 1 - lx
        return hy * hx * img[:, yl, xl] + hy * lx * img[:, yl, xh] + ly * hx * img[:, yh, xl] + ly * lx * img[:, yh, xh]

    off = 0.5 if aligned else 0.0
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        sw, sh, ew, eh = x1 * scale - off, y1 * scale - off, x2 * scale - off, y2 * scale - off
        rw, rh = ew - sw, eh - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        gh = ratio if ratio > 0 else math.ceil(rh / oh)
        gw = ratio if ratio > 0 else math.ceil(rw / ow)
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                acc = torch.zeros(ch, dtype=feats.dtype)
                for iy in range(gh):
                    y = sh + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = sw + pw * bw + (ix + 0.5) * bw / gw
                        acc += bilinear(feats[int(b)], y, x)
                result[r, :, ph, pw] = acc / count
    return result


def random_case(seed, batch=3, ch=4, height=6, width=9, n=12):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, ch, height, width, generator=gen, dtype=torch.float64)
    xy = torch.rand(n, 4, generator=gen, dtype=torch.float64) * torch.tensor([width, height] * 2) * 16 * 1.2 - 8
    boxes = torch.cat([torch.minimum(xy[:, :2], xy[:, 2:]), torch.maximum(xy[:, :2], xy[:, 2:])], 1)
    idx = torch.randint(0, batch, (n, 1), generator=gen).double()
    return feats, torch.cat([idx, boxes], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio,out", [(-1, (7, 7)), (0, (8, 8)), (2, (3, 5))])
def test_matches_scalar_kernel(aligned, ratio, out):
    feats, rois = random_case(seed=ratio + 10 * aligned)
    got = roi_align(feats, rois, out, spatial_scale=1 / 16, sampling_ratio=ratio, aligned=aligned)
    want = reference(feats, rois, out, 1 / 16, ratio, aligned)
    assert torch.allclose(got, want, atol=1e-10)


def test_gradient_reaches_features_and_actor_vector_is_the_max():
    feats, rois = random_case(seed=3)
    feats.requires_grad_(True)
    pooled = roi_align(feats, rois, 7, spatial_scale=1 / 16, aligned=True)
    vec = actor_vector(pooled)
    assert vec.shape == (len(rois), 4)
    assert torch.equal(vec, pooled.flatten(2).max(-1).values)
    vec.sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(
        lambda f: roi_align(f, rois[:3], 2, spatial_scale=1 / 16, sampling_ratio=2, aligned=True),
        (feats.detach()[:, :1].clone().requires_grad_(True),))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 0, 2])
def test_equals_torchvision(aligned, ratio):
    try:
        from torchvision.ops import roi_align as tv_roi_align
    except Exception:  # torchvision does not import against this torch on the CPU machine
        pytest.skip("torchvision is not importable here")
    feats, rois = random_case(seed=7, ch=16, height=16, width=22, n=40)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        f, r = feats.float().to(device), rois.float().to(device)
        got = roi_align(f, r, 7, spatial_scale=1 / 16, sampling_ratio=ratio, aligned=aligned)
        want = tv_roi_align(f, r, 7, spatial_scale=1 / 16, sampling_ratio=ratio, aligned=aligned)
        assert torch.allclose(got, want, atol=1e-5), device
