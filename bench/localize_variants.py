"""The ActionFormer family's variants against plain ActionFormer, on the same synthetic THUMOS-sized
features (2048-d, 20 classes; the generator of bench/localize_vs_reference.py), in one run.

Each variant is the thumos_i3d preset with its options set (``--set``-able params): it trains with the
same seed, data order and schedule, then detects on the test videos; the table gives the parameters,
training seconds per epoch (wall, and CPU seconds of this process, which compare even on a busy
machine), detection seconds and mAP (0.5, and the average over 0.3:0.7) with its difference to the
plain model. Test-time options (DIoU-NMS) reuse the trained plain model. One intra-op thread by default,
so the variants do not compete with each other's spinning threads on a shared machine.

    python bench/localize_variants.py --size tiny     # 8 / 4 videos, width 128, 1 + 3 epochs (minutes)
    python bench/localize_variants.py --size small    # 24 / 12 videos, width 256, 2 + 8 epochs
    python bench/localize_variants.py --size full     # 200 / 210 videos, width 512, 5 + 30 epochs (days on CPU)
    python bench/localize_variants.py --size tiny --variants actionformer v2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from localize_vs_reference import CLIP, DIM, FPS, STRIDE, TIOUS, _NpySource, make_dataset  # noqa: E402
from machine import cpu_model  # noqa: E402

# name: (train videos, test videos, min steps, max steps, warm-up epochs, cosine epochs, embed_dim)
SIZES = {
    "tiny": (8, 4, 300, 600, 1, 3, 128),
    "small": (24, 12, 300, 1200, 2, 8, 256),
    "full": (200, 210, 300, 6000, 5, 30, 512),
}
# trained variants: the options each sets over thumos_i3d (n_head 4 there)
VARIANTS = {
    "actionformer": {},
    "v2": {"backbone": "v2", "n_kv_head": 2},
    "tbtformer": {"model": "tbtformer", "fpn": "bifpn", "n_head": 16, "mlp_ratio": 6},
    "qfl": {"cls_loss": "qfl"},
    "eiou": {"reg_loss": "eiou"},
}
# test-time variants: (the trained variant they detect with, test options)
TEST_VARIANTS = {"actionformer+diou_nms": ("actionformer", {"nms_method": "diou", "iou_threshold": 0.5})}


def run_variant(name: str, options: dict, args, work: Path, gt, train, test, source) -> dict:
    import torch

    from localizers.actionformer import video_detections
    from localizers.anet_map import evaluate_detections
    from localizers.config import resolve
    from localizers.train import fit

    cfg = resolve({"preset": "thumos_i3d", "embed_dim": args.embed_dim, "epochs": args.epochs,
                   "warmup_epochs": args.warmup_epochs, "precision": args.precision, **options}
                  ).with_dims(DIM, len(gt.classes))
    out_dir = work / "runs" / name
    shutil.rmtree(out_dir, ignore_errors=True)  # fit resumes from a checkpoint it finds
    torch.manual_seed(0)
    c0 = time.process_time()
    result = fit(cfg, train, source, out_dir, device="cpu", log=lambda m: print(f"  {name}: {m}", flush=True))
    cpu_per_epoch = (time.process_time() - c0) / max(result.epochs_run, 1)
    model = (result.ema if args.weights == "ema" else result.model).eval()
    rows = {}
    for label, test_options in [(name, {})] + [(k, o) for k, (v, o) in TEST_VARIANTS.items() if v == name]:
        test_cfg = replace(cfg.test, **test_options)
        t0 = time.perf_counter()
        dets = {it.id: video_detections(model, source, it, test_cfg, gt.classes) for it in test}
        detect_s = time.perf_counter() - t0
        res = evaluate_detections(gt, dets, subset="test", tious=TIOUS)
        s = result.seconds_per_epoch
        rows[label] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                       "epoch_s": float(np.mean(s[1:] if len(s) > 1 else s)), "first_epoch_s": s[0],
                       "epoch_cpu_s": cpu_per_epoch, "detect_s": detect_s,
                       "map50": float(res.mAP[list(np.round(res.tious, 2)).index(0.5)]) * 100,
                       "avg_map": float(res.average_mAP) * 100, "options": {**options, **test_options}}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--embed-dim", type=int, default=None, help="model width (default: the size's)")
    p.add_argument("--epochs", type=int, default=None, help="cosine epochs (default: the size's)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="warm-up epochs (default: the size's)")
    p.add_argument("--weights", choices=["trained", "ema"], default=None,
                   help="weights evaluated (default: ema for >= 20 epochs; else the trained ones, the EMA of a "
                        "short run being still near the initialisation)")
    p.add_argument("--precision", default="auto", help="localize.precision (auto | fp32 | bf16)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--workdir", default=None, help="data and runs (default /tmp/localize_variants_<size>)")
    args = p.parse_args(argv)
    n_train, n_test, min_len, max_len, warm, cos, width = SIZES[args.size]
    args.epochs = cos if args.epochs is None else args.epochs
    args.warmup_epochs = warm if args.warmup_epochs is None else args.warmup_epochs
    args.embed_dim = width if args.embed_dim is None else args.embed_dim
    if args.weights is None:
        args.weights = "ema" if args.warmup_epochs + args.epochs >= 20 else "trained"
    work = Path(args.workdir or f"/tmp/localize_variants_{args.size}")
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from localizers.data import make_item
    from localizers.train import use_bf16
    from pipeline.annotations import load_temporal
    from pipeline.timemap import TimeGrid

    torch.set_num_threads(args.threads)
    bf16 = use_bf16(args.precision, torch.device("cpu"))
    print(f"CPU: {cpu_model()}; precision {'bf16' if bf16 else 'fp32'} (localize.precision={args.precision}); "
          f"{args.threads} thread(s)")
    print(f"size {args.size}: {n_train} train / {n_test} test videos of {min_len}-{max_len} steps of {DIM}-d "
          f"features; thumos_i3d at embed_dim {args.embed_dim}, {args.warmup_epochs} + {args.epochs} epochs, "
          f"{args.weights} weights evaluated; workdir {work}", flush=True)
    t0 = time.perf_counter()
    ann = make_dataset(work, n_train, n_test, min_len, max_len)
    print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    gt = load_temporal(ann)
    grid = TimeGrid(fps=FPS, stride=STRIDE, clip_len=CLIP)
    source = _NpySource(work / "features")
    top_stride = 32  # thumos_i3d: 6 levels

    def items(subset, check):
        return [make_item(vid, np.load(work / "features" / f"{vid}.npy", mmap_mode="r").shape, grid, v.duration,
                          v.segments, v.labels, gt.label_index(), DIM, top_stride, where=str(ann),
                          check_segments=check)
                for vid, v in gt.subset(subset).items()]

    train, test = items("validation", True), items("test", False)
    rows = {}
    for name in args.variants:
        print(f"{name}: training", flush=True)
        rows.update(run_variant(name, VARIANTS[name], args, work, gt, train, test, source))

    base = rows.get("actionformer")
    print()
    print(f"{'variant':<24}{'params M':>9}{'s/epoch':>9}{'CPU s/ep':>9}{'1st ep s':>9}{'detect s':>9}"
          f"{'mAP@0.5':>9}{'avg mAP':>9}{'vs plain':>9}")
    for name, r in rows.items():
        delta = f"{r['avg_map'] - base['avg_map']:+.2f}" if base else ""
        print(f"{name:<24}{r['params_m']:>9.2f}{r['epoch_s']:>9.1f}{r['epoch_cpu_s']:>9.1f}{r['first_epoch_s']:>9.1f}"
              f"{r['detect_s']:>9.1f}{r['map50']:>9.2f}{r['avg_map']:>9.2f}{delta:>9}")
    print("s/epoch: mean wall seconds after the first epoch; CPU s/ep: this process's CPU seconds per epoch; "
          "mAP in %, avg over tIoU 0.3:0.7")
    (work / "variants_result.json").write_text(json.dumps(
        {"cpu": cpu_model(), "precision": "bf16" if bf16 else "fp32", "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
