"""Detection heads side by side: keyframes per second in training (forward, loss, backward, SGD step with
the head's recipe groups) and in inference, and peak memory, per head on random inputs shaped like the
keyframe cache (float16 maps and context tokens, several clips of 1-6 actors per batch); then, in the
same run, each head trained and scored on the generated AVA-style dataset (``--dataset demo_ava``):
val frame-mAP@0.5, the relation classes' mean AP, keyframes per second in training and inference on
the real keyframe store, and the peak resident memory of that pipeline process.

Default: small widths (256-channel 8x8 maps, reduced head widths) that run in seconds on a laptop CPU.
``--full``: the published heads (2304-channel 16x16 maps, 32 context tokens) with the published clips per
GPU (ACRN 8, ACAR-Net 1, CycleACR 4), meant for a GPU. Peak memory is the CPU resident-set high-water
mark above the level before the head is built (Linux VmHWM), or torch.cuda.max_memory_allocated.
``measure(head_name, batches, ...)`` is reusable.

The mAP part runs the pipeline as a user does (``pipeline run eval --stage detect --dataset demo_ava
--set detect.head=H``, the demo's recipe; ACAR-Net and CycleACR at lr 3e-4 as in the README) in a fresh cache (or
``--cache-dir``): the keyframe store is extracted once and every head trains on it. Its rates come from
the stage's own timings (training epochs, inference), its memory from the process's rusage.

    python bench/detect_heads.py [--full] [--heads acrn,acar] [--device cuda] [--amp bf16] [--json]
                                 [--dataset demo_ava|''] [--seeds 0,1] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from machine import cpu_model  # noqa: E402

from detectors.heads import HEADS, ActorMemory, HeadInput, build_head  # noqa: E402

SMALL = dict(channels=256, size=8, tokens=8, head_cfg={
    "roi_linear": {"in_channels": 256},
    "acrn": {"in_channels": 256, "hidden": 256},
    "acar": {"in_channels": 256, "reduce_dim": 128, "hidden_dim": 64},
    "cycleacr": {"in_channels": 256, "dim_inner": 128, "temporal_len": 8, "mlp_dim": 256},
})
FULL = dict(channels=2304, size=16, tokens=32, head_cfg={name: {} for name in HEADS})
PUBLISHED_CLIPS = {"roi_linear": 8, "acrn": 8, "acar": 1, "cycleacr": 4}
ROOT = Path(__file__).resolve().parents[1]
# per head, what the README's demo table sets over data/demo_ava.yaml (at lr 0.003 CycleACR diverges,
# ACAR-Net at some seeds and CPUs)
DEMO_SETS = {"acar": ["detect.lr=0.0003"], "cycleacr": ["detect.lr=0.0003"]}
# the demo's classes whose evidence lies outside the actor's box (pipeline/demo_ava.py)
RELATION_CLASSES = ("touch", "carry", "approach", "near_person")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def random_batches(n: int, clips: int, channels: int, size: int, tokens: int, num_classes: int,
                   memory: tuple[int, int, int] | None = None, seed: int = 0):
    """``n`` (HeadInput, targets) pairs shaped like cached keyframes; ``memory`` = (seconds, per second,
    dim) adds a CycleACR memory bank with 60 % of its slots filled."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        counts = torch.randint(1, 7, (clips,), generator=gen)
        index = torch.repeat_interleave(torch.arange(clips), counts)
        xy = torch.rand(len(index), 4, generator=gen)
        boxes = torch.cat([torch.minimum(xy[:, :2], xy[:, 2:]), torch.maximum(xy[:, :2], xy[:, 2:])], 1)
        mem = None
        if memory is not None:
            seconds, per_sec, dim = memory
            mem = ActorMemory(torch.randn(clips, seconds, per_sec, dim, generator=gen),
                              torch.rand(clips, seconds, per_sec, generator=gen) < 0.6, before=seconds // 2)
        batch = HeadInput(maps=torch.randn(clips, channels, size, size, generator=gen).relu().half(),
                          rois=torch.cat([index[:, None].float(), boxes], 1), clip_index=index,
                          image_size=torch.tensor([[size * 16, size * 16]] * clips), feature_stride=16,
                          context=torch.randn(clips, channels, tokens, generator=gen).half(), memory=mem)
        targets = (torch.rand(len(index), num_classes, generator=gen) < 0.1).float()
        targets[torch.arange(len(index)), torch.randint(0, 13, (len(index),), generator=gen)] = 1
        out.append((batch, targets))
    return out


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(head_name: str, batches, *, cfg: dict | None = None, device: str = "cpu",
            amp: torch.dtype | None = None, iters: int = 2) -> dict:
    """Keyframes/s of ``head_name`` (built with ``cfg``) in training and inference over ``batches``
    ((HeadInput, targets) pairs, ``iters`` passes after one warm-up batch), and the peak memory."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    base = _status_bytes("VmRSS") if device == "cpu" else 0
    head = build_head(head_name, **(cfg or {})).to(device)
    batches = [(b.to(device), t.to(device)) for b, t in batches]
    optimizer = torch.optim.SGD(head.recipe.param_groups(head), lr=head.recipe.lr, momentum=0.9)
    autocast = dict(device_type=device, dtype=amp, enabled=amp is not None)

    def train_step(batch, targets):
        with torch.autocast(**autocast):
            loss = head.loss(head(batch), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step(batch, _targets):
        with torch.inference_mode(), torch.autocast(**autocast):
            head.scores(head(batch))

    rates = {}
    for mode, step in (("train", train_step), ("infer", infer_step)):
        head.train(mode == "train")
        step(*batches[0])
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            for batch, targets in batches:
                step(batch, targets)
        _sync(device)
        rates[mode] = iters * sum(b.num_clips for b, _ in batches) / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_bytes("VmHWM") - base
    return {"head": head_name, "params_m": round(sum(p.numel() for p in head.parameters()) / 1e6, 3),
            "train_kf_per_s": round(rates["train"], 2), "infer_kf_per_s": round(rates["infer"], 2),
            "peak_mib": round(peak / 2**20, 1),
            "actors_per_batch": round(sum(len(b.rois) for b, _ in batches) / len(batches), 1)}


def _pipeline(cache: Path, args: list[str], device: str) -> tuple[dict, int]:
    """One ``pipeline --json`` run in a child process: (its report, its peak resident bytes)."""
    cmd = [sys.executable, "-m", "pipeline", "--cache-dir", str(cache), "--json", *args,
           "--set", f"detect.device={device}", "--set", f"detect_eval.device={device}"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its memory high-water mark
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read().decode()[-2000:]}")
        return json.loads(out.read()), usage.ru_maxrss * 1024  # KiB on Linux


def _ap(value: float | None) -> str:
    """An AP for the table: ``-`` where no class of the group had one."""
    return f"{value:6.2f}" if value is not None else f"{'-':>6}"


def demo_map(head_name: str, dataset: str, seed: int, cache: Path, device: str) -> dict:
    """``head_name`` trained (seed ``seed``) and scored on ``dataset`` through the pipeline."""
    sets = [f"detect.head={head_name}", f"detect.seed={seed}", *DEMO_SETS.get(head_name, [])]
    report, peak = _pipeline(cache, ["run", "eval", "--stage", "detect", "--dataset", dataset,
                                     *(a for s in sets for a in ("--set", s))], device)
    stages = {s["name"]: s for s in report["stages"]}
    train_dir, eval_dir = Path(stages["detect"]["dir"]), Path(stages["detect_eval"]["dir"])
    keyframes = json.loads((train_dir / "config.json").read_text())["keyframes"]
    with open(train_dir / "train_log.csv", newline="") as f:
        epochs = [float(r["seconds"]) for r in csv.DictReader(f)]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    ap = {c["name"]: c["ap"] for c in metrics["per_class"]}
    relation = [ap[c] for c in RELATION_CLASSES if ap.get(c) is not None]
    return {"seed": seed, "sets": sets, "map": round(100 * metrics["mAP"], 2),
            "relation_ap": round(100 * sum(relation) / len(relation), 2) if relation else None,
            "store_train_kf_per_s": round(keyframes * len(epochs) / sum(epochs), 1),
            "store_infer_kf_per_s": round(metrics["keyframes"] / metrics["inference_seconds"], 1),
            "process_peak_mib": round(peak / 2**20, 1), "ran": stages["detect"]["status"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="published sizes (2304x16x16 maps)")
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--clips", type=int, default=0, help="clips per batch (default: 4, or published)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--dataset", default="demo_ava",
                        help="train and score every head on this dataset for the mAP columns ('': skip)")
    parser.add_argument("--seeds", default="0", help="training seeds of the mAP run, comma-separated")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="pipeline cache of the mAP run (default: a fresh temporary one; a reused one "
                             "may hold the runs already, and then reports their timings, not new ones)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    heads = [h for h in args.heads.split(",") if h]
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        parser.error(f"--heads: unknown {', '.join(unknown)}; known: {', '.join(HEADS)}")
    sizes = FULL if args.full else SMALL
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    precision = f"{args.amp}-autocast" if amp else "fp32"
    print(f"# {where}, torch {torch.__version__}, {torch.get_num_threads()} threads, {precision}, "
          f"{'full' if args.full else 'small'} sizes: {sizes['channels']}x{sizes['size']}x{sizes['size']} maps, "
          f"{sizes['tokens']} context tokens", flush=True)
    rows = []
    for name in heads:
        cfg = sizes["head_cfg"][name]
        probe = build_head(name, **cfg)  # its class count and memory shape; measure builds its own
        memory = None
        if hasattr(probe, "memory_length"):
            before, after = probe.memory_length
            memory = (before + 1 + after, probe.max_per_sec, probe.dim_inner)
        num_classes = probe.num_classes
        del probe
        clips = args.clips or (PUBLISHED_CLIPS[name] if args.full else 4)
        batches = random_batches(args.batches, clips, sizes["channels"], sizes["size"], sizes["tokens"],
                                 num_classes, memory=memory)
        row = {**measure(name, batches, cfg=cfg, device=args.device, amp=amp, iters=args.iters),
               "clips_per_batch": clips, "device": where, "precision": precision}
        rows.append(row)
        if not args.json:
            print(f"{name:11s} params {row['params_m']:8.3f} M  clips/batch {clips:2d}  "
                  f"actors/batch {row['actors_per_batch']:5.1f}  train {row['train_kf_per_s']:8.2f} kf/s  "
                  f"infer {row['infer_kf_per_s']:8.2f} kf/s  peak {row['peak_mib']:8.1f} MiB", flush=True)
    if args.dataset:
        seeds = [int(x) for x in args.seeds.split(",") if x]
        with tempfile.TemporaryDirectory(prefix="detect_heads_") as tmp:
            cache = args.cache_dir or Path(tmp)
            # the keyframe store first, in a process of its own: the heads' processes only train and score
            _pipeline(cache, ["run", "extract_keyframes", "--dataset", args.dataset], args.device)
            if not args.json:
                print(f"# {args.dataset}: val frame-mAP@0.5 (%), relation = mean AP of {', '.join(RELATION_CLASSES)}; "
                      f"rates on its keyframe store, peak RSS of the pipeline process; {precision}", flush=True)
            for row in rows:
                row["demo"] = []
                for seed in seeds:
                    got = demo_map(row["head"], args.dataset, seed, cache, args.device)
                    row["demo"].append(got)
                    if not args.json:
                        print(f"{row['head']:11s} seed {seed}  mAP {got['map']:6.2f}  relation {_ap(got['relation_ap'])}  "
                              f"train {got['store_train_kf_per_s']:7.1f} kf/s  infer {got['store_infer_kf_per_s']:7.1f} "
                              f"kf/s  peak {got['process_peak_mib']:7.1f} MiB  ({got['ran']}; {' '.join(got['sets'])})",
                              flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
