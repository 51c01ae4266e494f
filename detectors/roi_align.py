"""RoIAlign in pure torch, with the semantics of ``torchvision.ops.roi_align`` (and mmcv's ``RoIAlign``
in ``avg`` mode, which equals it), vectorised over boxes.

Bilinear sampling is separable: a sample's value is ``sum_y sum_x wy * wx * f[y, x]`` and the validity
test (``-1 <= y <= H`` and ``-1 <= x <= W``) is a product of a y and an x condition. So the average over
one bin's ``gh x gw`` samples is ``Ay @ f @ Ax^T`` with ``Ay`` (oh, H) the mean over the bin's y samples of
their interpolation rows. Building ``Ay``/``Ax`` for every box at once turns RoIAlign into two batched
matmuls, with no loop over boxes and no per-box grid-size sync.
"""

from __future__ import annotations

import torch


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    oh, ow = size
    return int(oh), int(ow)


def _axis_weights(start: torch.Tensor, length: torch.Tensor, bins: int, size: int,
                  sampling_ratio: int) -> torch.Tensor:
    """(R, bins, size): for each box and output bin along one axis, the mean over that bin's samples of
    their bilinear interpolation weights over the ``size`` feature positions (invalid samples weigh 0)."""
    bin_len = length / bins  # (R,)
    if sampling_ratio > 0:
        grid = torch.full_like(length, float(sampling_ratio))
        max_grid = sampling_ratio
    else:
        # torchvision: ceil(roi_len / bins) samples per bin, per box; pad every box to the largest grid
        # and mask the surplus samples.
        grid = torch.ceil(length / bins)
        max_grid = int(grid.max().item()) if grid.numel() else 0
    max_grid = max(max_grid, 1)
    i = torch.arange(max_grid, device=start.device, dtype=start.dtype)
    b = torch.arange(bins, device=start.device, dtype=start.dtype)
    safe_grid = grid.clamp(min=1)[:, None, None]
    # (R, bins, G) sample coordinates
    pos = (start[:, None, None] + b[None, :, None] * bin_len[:, None, None]
           + (i[None, None, :] + 0.5) * bin_len[:, None, None] / safe_grid)
    keep = (i[None, None, :] < grid[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    w_low = (1.0 - frac) * keep
    w_high = frac * keep
    weights = torch.zeros(*pos.shape, size, device=pos.device, dtype=pos.dtype)
    weights.scatter_add_(-1, low[..., None], w_low[..., None])
    weights.scatter_add_(-1, high[..., None], w_high[..., None])
    return weights.sum(dim=2) / safe_grid


def roi_align(feats: torch.Tensor, rois: torch.Tensor, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """``feats`` (B, C, H, W); ``rois`` (R, 5) rows ``[batch_index, x1, y1, x2, y2]`` in the units that
    ``spatial_scale`` maps to feature cells (input pixels with ``1/stride``, or feature cells with 1).
    ``sampling_ratio <= 0`` picks ``ceil(roi_size / output_size)`` samples per bin and axis, per box.
    ``aligned=True`` shifts box corners by -0.5 cell (pixel-centre convention, mmcv/detectron2);
    ``aligned=False`` keeps the legacy convention and forces boxes to at least 1x1 cell.
    Returns (R, C, oh, ow). Gradients flow to ``feats`` only, as in torchvision."""
    oh, ow = _pair(output_size)
    if feats.dim() != 4 or rois.dim() != 2 or rois.shape[-1] != 5:
        raise ValueError(f"roi_align: feats must be (B,C,H,W) and rois (R,5), got {tuple(feats.shape)} "
                         f"and {tuple(rois.shape)}")
    _, channels, height, width = feats.shape
    if rois.shape[0] == 0:
        return feats.new_zeros(0, channels, oh, ow)
    boxes = rois.detach().to(torch.float64 if feats.dtype == torch.float64 else torch.float32)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, k] * spatial_scale - offset for k in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    ay = _axis_weights(y1, roi_h, oh, height, sampling_ratio).to(feats.dtype)  # (R, oh, H)
    ax = _axis_weights(x1, roi_w, ow, width, sampling_ratio).to(feats.dtype)   # (R, ow, W)
    per_box = feats[boxes[:, 0].long()]  # (R, C, H, W)
    rows = torch.einsum("roh,rchw->rcow", ay, per_box)
    return torch.einsum("rcow,rpw->rcop", rows, ax)


def actor_vector(roi_feats: torch.Tensor) -> torch.Tensor:
    """(R, C, oh, ow) -> (R, C): the spatial max pool every head applies to its RoI features."""
    return roi_feats.amax(dim=(-2, -1))
