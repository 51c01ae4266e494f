"""Where one ActionFormer training iteration spends its time: ours and the reference side by side.

Each side runs in its own process on the same synthetic THUMOS-sized videos (thumos_i3d recipe, batch 2,
the reference's venv as in ``bench/localize_vs_reference.py``), a few warm-up iterations, then the mean
CPU time (``--clock wall``: wall time) per iteration of each phase: data (crop, read, collate), the
forward of every backbone block,
the neck and the heads, the target assignment, the loss, backward and the optimizer (clipping, AdamW,
schedule, EMA). Times come from forward hooks and wrapped functions (CPU: every op has finished when
it returns; on CUDA each boundary synchronises, so the split costs a little speed there).

    python bench/localize_profile.py                       # fp32, 2304-step videos, 3 timed iterations
    python bench/localize_profile.py --threads 1 --iters 2   # one thread: CPU seconds are the compute's
    python bench/localize_profile.py --length 1200 --iters 5 --threads 1
    python bench/localize_profile.py --torch-profiler      # also torch.profiler's top ops of ours
    python bench/localize_profile.py --device cuda --precision bf16 --iters 20   # a GPU: both in bf16

``--device cuda`` is the GPU check: both sides on the GPU (the reference under bf16 autocast too when
``--precision bf16``), phases timed by the wall clock with a synchronise at each boundary, iterations per
second and the peak GPU memory (``torch.cuda.max_memory_allocated``) of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import localize_vs_reference as lvr  # noqa: E402  (the shared data generator and reference config)
from machine import cpu_summary  # noqa: E402


class Phases:
    """Seconds of ``clock`` per named phase, nested phases included in their parents."""

    def __init__(self, clock, sync=lambda: None):
        self.seconds = defaultdict(float)
        self.clock = clock
        self.sync = sync
        self.order: list[str] = []

    @contextmanager
    def __call__(self, name: str):
        self.sync()
        t0 = self.clock()
        try:
            yield
        finally:
            self.sync()
            if name not in self.seconds:
                self.order.append(name)
            self.seconds[name] += self.clock() - t0

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            with self(name):
                return fn(*a, **kw)
        return timed

    def hook_modules(self, model, names: dict[str, str]) -> None:
        """Time the forward of each submodule ``path`` under the phase ``names[path]``."""
        for path, phase in names.items():
            module = model.get_submodule(path)
            starts = []

            def start(m, a, starts=starts) -> None:  # returning None keeps the inputs unchanged
                self.sync()
                starts.append(self.clock())
            module.register_forward_pre_hook(start)

            def done(m, a, out, starts=starts, phase=phase):
                self.sync()
                if phase not in self.seconds:
                    self.order.append(phase)
                self.seconds[phase] += self.clock() - starts.pop()
            module.register_forward_hook(done)


def block_names(model) -> dict[str, str]:
    """Submodule path -> phase; the same names in both implementations."""
    bb = model.backbone
    names = {f"backbone.embd.{i}": "fwd embed convs" for i in range(len(bb.embd))}
    names |= {f"backbone.embd_norm.{i}": "fwd embed convs" for i in range(len(bb.embd_norm))}
    names |= {f"backbone.stem.{i}": f"fwd stem block {i}" for i in range(len(bb.stem))}
    names |= {f"backbone.branch.{i}": f"fwd branch block {i} (level {i + 1})" for i in range(len(bb.branch))}
    names |= {"neck": "fwd neck", "cls_head": "fwd cls head", "reg_head": "fwd reg head"}
    return names


def _dataset(args) -> Path:
    work = Path(args.workdir)
    lvr.make_dataset(work, args.videos, 1, args.length, args.length)
    return work


def run_ours(args) -> dict:
    import numpy as np
    import torch
    from torch import nn

    import localizers.actionformer as af
    from localizers.actionformer import LossNormalizer, build_model, collate, regressed_points
    from localizers.config import resolve
    from localizers.data import batch_targets, make_item, random_crop, read_features
    from localizers.train import param_groups, use_bf16
    from pipeline.annotations import load_temporal
    from pipeline.timemap import TimeGrid

    work = _dataset(args)
    gt = load_temporal(work / "annotations.json")
    cfg = resolve({"preset": "thumos_i3d", "precision": args.precision}).with_dims(lvr.DIM, len(gt.classes))
    tc, mc = cfg.train, cfg.model
    grid = TimeGrid(fps=lvr.FPS, stride=lvr.STRIDE, clip_len=lvr.CLIP)
    source = lvr._NpySource(work / "features")
    items = [make_item(vid, np.load(work / "features" / f"{vid}.npy", mmap_mode="r").shape, grid, v.duration,
                       v.segments, v.labels, gt.label_index(), lvr.DIM, mc.strides[-1])
             for vid, v in gt.subset("validation").items()]
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    normalizer = LossNormalizer(tc.loss_norm_init, tc.loss_norm_momentum)
    device = torch.device(args.device)
    model.to(device)
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    # as localizers.train: fused AdamW, bf16 where the precision asks for it
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, fused=True)
    bf16 = use_bf16(tc.precision, device)
    ph = Phases(_clock(args), _sync(torch, device))
    ph.hook_modules(model, block_names(model))
    af.assign_targets = ph.wrap("targets (assignment)", af.assign_targets)
    rng = np.random.default_rng(0)

    def iteration(i):
        with ph("data (crop, read, collate)"):
            chosen = [items[(2 * i + k) % len(items)] for k in range(2)]
            crops = [random_crop(v, mc.max_seq_len, cfg.data.trunc_thresh, cfg.data.crop_ratio, rng) for v in chosen]
            x, mask = collate([read_features(source, v, c.start, c.stop) for v, c in zip(chosen, crops)], mc, True)
            x, mask, segs, labels, valid = (t.to(device) for t in (x, mask, *batch_targets(crops)))
        with ph("forward (total)"):  # as localizers.train: the regression head at the positives only
            need = regressed_points(mc, x.shape[1], segs, labels, valid, tc.center_radius)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x, mask, need)
        with ph("loss + targets"):
            losses = af.compute_losses(out, segs, labels, valid, normalizer, tc)
        with ph("backward"):
            losses["loss"].backward()
        with ph("optimizer (clip, AdamW, EMA)"):
            nn.utils.clip_grad_norm_(params, tc.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - tc.ema_decay)
        return float(losses["loss"])

    return _measure(args, ph, iteration, {"precision": "bf16" if bf16 else "fp32"}, torch, device,
                    profile_ours=args.torch_profiler)


def run_reference(args) -> dict:
    import torch

    from actionformer.datasets import make_dataset as af_dataset
    from actionformer.modeling import make_meta_arch
    from actionformer.utils import ModelEma, fix_random_seed, make_optimizer, make_scheduler

    work = _dataset(args)
    ns = argparse.Namespace(epochs=1, warmup_epochs=1)
    cfg = lvr._reference_config(work, ns)
    fix_random_seed(0, include_cuda=False)
    train_set = af_dataset(cfg["dataset_name"], True, cfg["train_split"], **cfg["dataset"])
    cfg["model"]["train_cfg"]["head_empty_cls"] = train_set.get_attributes()["empty_label_ids"]
    device = torch.device(args.device)
    model = make_meta_arch(cfg["model_name"], **cfg["model"]).to(device)  # its batching follows the weights
    model.train()
    bf16 = device.type == "cuda" and args.precision == "bf16"
    optimizer = make_optimizer(model, cfg["opt"])
    scheduler = make_scheduler(optimizer, cfg["opt"], 100)
    ema = ModelEma(model)
    ph = Phases(_clock(args), _sync(torch, device))
    ph.hook_modules(model, block_names(model))
    model.preprocessing = ph.wrap("data (crop, read, collate)", model.preprocessing)
    model.label_points = ph.wrap("loss + targets", ph.wrap("targets (assignment)", model.label_points))
    model.losses = ph.wrap("loss + targets", model.losses)

    def iteration(i):
        with ph("data (crop, read, collate)"):
            video_list = [train_set[(2 * i + k) % len(train_set)] for k in range(2)]
        with ph("forward (total)"):  # its forward also batches the inputs, assigns targets and computes the loss
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                losses = model(video_list)
        with ph("backward"):
            losses["final_loss"].backward()
        with ph("optimizer (clip, AdamW, EMA)"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["train_cfg"]["clip_grad_l2norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(model)
        return float(losses["final_loss"])

    return _measure(args, ph, iteration, {"precision": "bf16" if bf16 else "fp32"}, torch, device,
                    profile_ours=False)


def _clock(args):
    return time.process_time if args.clock == "cpu" else time.perf_counter


def _sync(torch, device):
    """What each phase boundary waits for: the GPU's queued kernels (nothing to wait for on CPU)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _measure(args, ph: Phases, iteration, extra: dict, torch, device, profile_ours: bool) -> dict:
    torch.set_num_threads(args.threads)
    for i in range(args.warmup):
        iteration(i)
    ph.seconds.clear()
    ph.order.clear()
    sync = _sync(torch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.iters):
        iteration(args.warmup + i)
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if device.type == "cuda":
        extra = {**extra, "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    phases = {k: ph.seconds[k] / args.iters for k in ph.order}  # before the profiled iteration adds to them
    top = None
    if profile_ours:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            iteration(args.warmup + args.iters)
        top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return {"phases": phases, "iter_s": wall / args.iters,
            "iter_cpu_s": cpu / args.iters, "threads": torch.get_num_threads(), "torch_top": top, **extra}


def _side(side: str, python: str, args) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--side", side, "--workdir", args.workdir, "--length",
           str(args.length), "--videos", str(args.videos), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--precision", args.precision, "--clock", args.clock, "--device", args.device] + (["--torch-profiler"] if args.torch_profiler else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) if side == "ours" else "")
    done = subprocess.run(cmd, cwd=ROOT if side == "ours" else args.workdir, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(ours: dict, ref: dict | None, clock: str) -> None:
    print(f"{'phase (' + ('CPU' if clock == 'cpu' else 'wall') + ' s per iteration)':<40}{'reference':>11}{'ours':>11}{'ours/ref':>10}")
    names = list(dict.fromkeys((ref["phases"] if ref else {}) | ours["phases"]))
    for name in names:
        r = ref["phases"].get(name) if ref else None
        o = ours["phases"].get(name)
        cell = lambda v: f"{v:>11.3f}" if v is not None else f"{'-':>11}"
        ratio = f"{o / r:>10.2f}" if o is not None and r else ""
        print(f"{name:<40}{cell(r)}{cell(o)}{ratio}")
    for key, label in (("iter_s", "iteration, wall"), ("iter_cpu_s", "iteration, CPU (all threads)"),
                       ("iters_per_s", "iterations per second (wall)"), ("peak_gpu_mib", "peak GPU memory (MiB)")):
        if key == "iters_per_s":
            o, r = 1 / ours["iter_s"], (1 / ref["iter_s"] if ref else None)
        elif key in ours:
            o, r = ours[key], (ref.get(key) if ref else None)
        else:
            continue
        print(f"{label:<40}{(f'{r:>11.3f}' if r else f'{chr(45):>11}')}{o:>11.3f}" + (f"{o / r:>10.2f}" if r else ""))
    print("the reference's forward (total) includes its batching, target assignment and loss (listed above it); "
          "ours includes one target assignment (the points to regress at), counted in targets too")
    if ours.get("torch_top"):
        print("\ntorch.profiler, ours, one iteration (self CPU time):\n" + ours["torch_top"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=2304, help="steps per video (default 2304 = max_seq_len)")
    p.add_argument("--videos", type=int, default=4, help="synthetic training videos (default 4)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    p.add_argument("--threads", default="auto", help="intra-op threads of both (default: pipeline.threads' choice)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="ours (the reference is fp32, or bf16 autocast too with --device cuda --precision bf16)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: both sides on that GPU, wall clock")
    p.add_argument("--workdir", default=None, help="synthetic data (default /tmp/localize_profile_<length>)")
    p.add_argument("--ref-python", default=None, help="python of the reference's venv (default bench/.ref-venv/bin/python)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="what the phases are timed by (default cpu: the process's CPU seconds, all threads; on a "
                        "shared machine wall seconds per phase mostly measure the other processes)")
    p.add_argument("--ours-only", action="store_true", help="skip the reference")
    p.add_argument("--torch-profiler", action="store_true", help="also print torch.profiler's top ops of ours")
    args = p.parse_args(argv)
    args.workdir = args.workdir or f"/tmp/localize_profile_{args.length}"
    if args.device != "cpu":
        args.clock = "wall"  # CPU seconds say nothing of a GPU's work
    if args.side:
        args.threads = int(args.threads)
        print(json.dumps((run_ours if args.side == "ours" else run_reference)(args)))
        return 0
    from pipeline.threads import choose_threads  # here: the reference's process has no pipeline package

    threads, why = choose_threads(None if args.threads == "auto" else int(args.threads))
    args.threads = threads
    print(f"{cpu_summary()}, {threads} threads ({why}), load average {os.getloadavg()[0]:.2f}; "
          f"{args.videos} videos of {args.length} steps x {lvr.DIM}, batch 2, thumos_i3d; "
          f"ours {args.precision}, reference {'bf16' if args.device != 'cpu' and args.precision == 'bf16' else 'fp32'}; "
          f"{args.device}; mean of {args.iters} iterations after {args.warmup}", flush=True)
    ours = _side("ours", sys.executable, args)
    ref = None
    if not args.ours_only:
        ref = _side("reference", args.ref_python or lvr.reference_python(), args)
    report(ours, ref, args.clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
