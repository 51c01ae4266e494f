"""Trains the tiny RAFT on synthetic motion and writes extractors/assets/raft_tiny.pt (float16, ~0.2 MB).

No optical-flow dataset or published weights can be fetched here, and a RAFT with random weights
recovers no motion, so tests and the demo use this small network trained on generated pairs: a
random multi-scale colour texture, and the same texture moved by a random similarity transform
(translation up to +-8 px, rotation up to +-6 degrees, scale 0.95-1.05) about the image centre, with
pixel noise. Ground truth is exact: a point p moves to A(p), so the flow at p is A(p) - p. The loss is
RAFT's: L1 of every iteration's flow, weighted 0.8^(N-i).

Deterministic for a given seed, thread count and CPU (the default: 1 thread, which is also the fastest
on a loaded machine).

    python tools/train_raft_tiny.py [--steps 2000] [--seed 0] [--out extractors/assets/raft_tiny.pt]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extractors.raft import RAFT, TINY_WEIGHTS  # noqa: E402


def textures(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) in [0, 255]: noise at four scales, summed, stretched to the full range."""
    out = torch.zeros(n, 3, size, size)
    for cells, weight in ((4, 1.0), (8, 0.7), (16, 0.5), (32, 0.35)):
        noise = torch.rand(n, 3, cells, cells, generator=gen)
        out += weight * F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    lo = out.amin(dim=(1, 2, 3), keepdim=True)
    hi = out.amax(dim=(1, 2, 3), keepdim=True)
    return (out - lo) / (hi - lo) * 255


def pair(n: int, size: int, gen: torch.Generator, max_shift: float = 8.0, max_deg: float = 6.0):
    """Two views of random textures and the flow from the first to the second (pixels)."""
    big = size + 2 * 24
    tex = textures(n, big, gen)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    p = torch.stack([xs, ys], -1).expand(n, size, size, 2)        # (x, y) in image 1
    c = (size - 1) / 2
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(max_deg)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.05
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * max_shift
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)   # (n, 2, 2)

    def sample(points):   # image-1 coordinates -> texture pixels
        xy = points + 24
        grid = 2 * xy / (big - 1) - 1
        return F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=True)

    moved = torch.einsum("nij,nhwj->nhwi", rot, p - c) + c + shift.view(n, 1, 1, 2)
    flow = (moved - p).permute(0, 3, 1, 2)
    # image2(q) = image1(A^-1 q)
    inv = torch.linalg.inv(rot)
    back = torch.einsum("nij,nhwj->nhwi", inv, p - c - shift.view(n, 1, 1, 2)) + c
    im1, im2 = sample(p), sample(back)
    noise = lambda x: (x + torch.randn(x.shape, generator=gen) * 3).clamp(0, 255)  # noqa: E731
    return noise(im1), noise(im2), flow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=TINY_WEIGHTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = RAFT("tiny", iters=args.iters).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        im1, im2, flow = pair(args.batch, args.size, gen)
        preds = model.predictions(im1, im2)
        n = len(preds)
        loss = sum(0.8 ** (n - 1 - i) * (p - flow).abs().mean() for i, p in enumerate(preds))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            epe = (preds[-1] - flow).norm(dim=1).mean().item()
            print(f"step {step}  loss {loss.item():.3f}  epe {epe:.3f} px  {time.perf_counter() - t0:.0f} s",
                  flush=True)
    model.eval()
    with torch.no_grad():
        im1, im2, flow = pair(64, args.size, torch.Generator().manual_seed(args.seed + 1))
        epe = (model(im1, im2, iters=12) - flow).norm(dim=1).mean().item()
    print(f"held-out EPE (64 pairs, 12 iterations): {epe:.3f} px")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
