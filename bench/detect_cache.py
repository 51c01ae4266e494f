"""What the keyframe cache buys per training step: a detection head trained on cached maps (read from a
keyframe store) against the same step with the backbone's maps recomputed from the clips (the backbone
frozen, forward only, as a head-only experiment would need without the cache).

Backbones: SlowFast R50 8x8 at the AVA setting (res5 spatial stride removed: output stride 16, 32 frames
per clip, 256x256 input -> 2304 x 16 x 16 maps), full and tiny (width 16, one block per stage, same
input). Heads: those named by ``--heads`` (default roi_linear), 4 actors per clip.
fp32, torch's default threads unless ``--threads``; on a GPU when ``torch.cuda.is_available()``.

Then (``--evaluator``, default on) the AVA evaluator against a straightforward per-class loop, as
``bench/ava_eval.py`` runs it.

    python bench/detect_cache.py [--batch 2] [--iters 3] [--heads roi_linear,acar] [--full/--no-full]
                                 [--evaluator/--no-evaluator] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from machine import cpu_model  # noqa: E402

from detectors.data import Keyframe, MapSource, collate  # noqa: E402
from detectors.heads import build_head  # noqa: E402
from extractors import slowfast  # noqa: E402
from pipeline.store import create_store  # noqa: E402
from pipeline.store.loader import RecordReader  # noqa: E402

CLIP_LEN, SIZE, STRIDE, ACTORS, CLASSES = 32, 256, 16, 4, 60




def ava_map(model: slowfast.SlowFast, clips: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W): slow and fast averaged over time, concatenated (the keyframe store's ``map``)."""
    slow, fast = model.forward_maps(clips)
    return torch.cat([slow.mean(2), fast.mean(2)], 1).float()


def keyframes(batch: int, rng: np.random.Generator) -> list[Keyframe]:
    out = []
    for i in range(batch):
        xy = rng.uniform(0, 0.6, (ACTORS, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0.15, 0.4, (ACTORS, 2))], 1).astype(np.float32)
        targets = (rng.uniform(size=(ACTORS, CLASSES)) < 0.05).astype(np.float32)
        targets[:, 0] = 1
        out.append(Keyframe(f"v{i}", 902, boxes, targets, np.ones(ACTORS, np.float32)))
    return out


def build_store(root: Path, kfs: list[Keyframe], maps: torch.Tensor) -> MapSource:
    c, h, w = maps.shape[1:]
    attrs = {"index": "keyframe", "fields": {"map": ["C", "H", "W"], "context": ["C", "T"]},
             "feature_dim": c, "feature_stride": STRIDE}
    with create_store(root, "zarr", "float16", attrs) as store:
        for k, m in zip(kfs, maps):
            store.write(k.rid, {"map": m.numpy(), "context": m.amax((1, 2))[:, None].repeat(1, 8).numpy()},
                        {"frame_height": h * STRIDE, "frame_width": w * STRIDE})
    source = MapSource(RecordReader(root), [k.rid for k in kfs])
    source._memory = None  # read from the store at every step, as a split too large for memory would
    return source


def timed(fn, iters: int) -> float:
    def synced():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    synced()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        synced()
    return (time.perf_counter() - t0) / iters


def run_variant(name: str, tiny: bool, heads: list[str], batch: int, iters: int, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = slowfast.build(tiny=tiny, arch="r50_8x8", res5_dilation=2).eval().to(device)
    clips = torch.randn(batch, 3, CLIP_LEN, SIZE, SIZE, device=device)
    with torch.no_grad():
        maps = ava_map(model, clips).cpu()
    kfs = keyframes(batch, np.random.default_rng(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = build_store(Path(tmp), kfs, maps)
        for head_name in heads:
            try:
                head = build_head(head_name, in_channels=maps.shape[1], num_classes=CLASSES).to(device)
            except (TypeError, ValueError) as exc:
                rows.append({"backbone": name, "head": head_name, "skipped": str(exc)})
                continue
            opt = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9)

            def head_step(inputs, targets):
                opt.zero_grad(set_to_none=True)
                loss = head.loss(head(inputs), targets)
                loss.backward()
                opt.step()

            def cached():
                inputs, targets = collate(kfs, source, 0.075, torch.Generator().manual_seed(0))
                head_step(inputs.to(device), targets.to(device))

            def recomputed():
                with torch.no_grad():
                    fresh = ava_map(model, clips)
                inputs, targets = collate(kfs, source, 0.075, torch.Generator().manual_seed(0))
                inputs.maps = fresh
                head_step(inputs.to(device), targets.to(device))

            t_cached, t_recomputed = timed(cached, iters), timed(recomputed, max(1, iters // 2) if not tiny else iters)
            rows.append({"backbone": name, "head": head_name, "map": list(maps.shape[1:]), "batch_clips": batch,
                         "cached_step_s": t_cached, "recomputed_step_s": t_recomputed,
                         "ratio": t_recomputed / t_cached})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2, help="clips per step")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--heads", default="roi_linear", help="comma-separated head names")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                   help="also the full SlowFast R50 (slow on CPU: about a minute)")
    p.add_argument("--evaluator", action=argparse.BooleanOptionalAction, default=True,
                   help="also the AVA evaluator against a straightforward per-class loop (bench/ava_eval.py)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heads = [h for h in a.heads.split(",") if h]
    rows = run_variant("slowfast_r50_tiny", True, heads, a.batch, a.iters, device)
    if a.full:
        rows += run_variant("slowfast_r50", False, heads, a.batch, a.iters, device)
    where = (torch.cuda.get_device_name() if device.type == "cuda" else cpu_model())
    meta = {"device": where, "precision": "fp32", "threads": torch.get_num_threads(), "torch": torch.__version__}
    if a.json:
        print(json.dumps({**meta, "rows": rows}))
        return 0
    print(f"# {meta['device']}, {meta['precision']}, {meta['threads']} threads, torch {meta['torch']}; "
          f"{a.batch} clips x {ACTORS} actors per step, {CLIP_LEN}x{SIZE}x{SIZE} clips")
    print(f"{'backbone':<20} {'head':<11} {'map':<14} {'cached s/step':>14} {'recomputed s/step':>18} {'ratio':>8}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['backbone']:<20} {r['head']:<11} skipped: {r['skipped']}")
            continue
        print(f"{r['backbone']:<20} {r['head']:<11} {'x'.join(map(str, r['map'])):<14} {r['cached_step_s']:>14.4f} "
              f"{r['recomputed_step_s']:>18.3f} {r['ratio']:>7.0f}x")
    if a.evaluator:
        import ava_eval  # bench/ava_eval.py, beside this script

        print("# AVA frame-mAP evaluator: vectorised vs a per-keyframe, per-class loop")
        return ava_eval.main(["--repeat", "1"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
