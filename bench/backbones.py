"""Backbone throughput benchmark: clips per second and peak memory of each backbone family at the input
of its preset (clip length x crop of thumos_i3d, anet_tsp, epic_slowfast, thumos_videomae_v2).

CPU: the tiny variants (what tests and the demo run), fp32. GPU (when ``torch.cuda.is_available()``): the
full variants under bf16 autocast, each conv net timed both in the default layout and channels_last_3d
(the faster is marked). A family whose module is not in the tree yet is skipped with a note.
Each backbone runs in a fresh process; its peak memory covers weights, input and activations: on CPU the
resident-set high-water mark above the level after imports (Linux /proc/self/clear_refs + VmHWM), on GPU
torch.cuda.max_memory_allocated.

    python bench/backbones.py [--batch 2] [--gpu-batch 8] [--iters 3] [--cpu-only] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from extractors.presets import PRESETS  # noqa: E402
from extractors.registry import BACKBONES  # noqa: E402

# family -> (preset, build kwargs of the tiny and of the full variant the preset reproduces, conv net?)
# The tiny VideoMAE is a patch-16 ViT: ViT-g's patch 14 does not divide the tiny native size.
FAMILIES = {
    "i3d": ("thumos_i3d", {"stream": "rgb"}, {"stream": "rgb"}, True),
    "r2plus1d_34": ("anet_tsp", {}, {}, True),
    "slowfast": ("epic_slowfast", {"arch": "r50_8x8"}, {"arch": "r50_8x8"}, True),
    "videomae": ("thumos_videomae_v2", {"variant": "vit_b"}, {"variant": "vit_g"}, False),
}


def preset_input(preset_name: str) -> tuple[int, int, int]:
    preset = PRESETS[preset_name]
    height, width = preset.crop or preset.size
    return preset.clip_len, height, width


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def time_model(model, clips, iters: int, device: str, autocast_dtype=None) -> float:
    """Clips per second over ``iters`` forwards after one warm-up forward."""
    def step():
        with torch.inference_mode(), torch.autocast(device, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            return model(clips)

    step()  # warm-up: kernel selection / primitive creation
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        out = step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.dtype == torch.float32 and out.shape[0] == clips.shape[0]
    return clips.shape[0] * iters / elapsed


def bench_family(name: str, device: str, batch: int, iters: int) -> list[dict]:
    """Runs in a fresh process, so the memory high-water mark belongs to this backbone alone: weights,
    input and activations (CPU: resident set above the level after imports; GPU: peak allocated)."""
    preset, tiny_kwargs, full_kwargs, conv = FAMILIES[name]
    module = BACKBONES[name].split(":")[0]
    try:
        build = importlib.import_module(module).build
    except ModuleNotFoundError as exc:
        print(f"note: {name}: {module} not importable ({exc}); skipped", file=sys.stderr)
        return []
    t, h, w = preset_input(preset)
    tiny = device == "cpu"
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    rows = []
    layouts = ("default", "channels_last_3d") if device == "cuda" and conv else ("default",)
    for layout in layouts:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            base = _status_kib("VmRSS") * 1024
        model = build(tiny=tiny, **(tiny_kwargs if tiny else full_kwargs)).to(device)
        clips = torch.randn(batch, model.in_channels, t, h, w, device=device)
        if layout == "channels_last_3d":
            model = model.to(memory_format=torch.channels_last_3d)
            clips = clips.contiguous(memory_format=torch.channels_last_3d)
        rate = time_model(model, clips, iters, device, torch.bfloat16 if device == "cuda" else None)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024 - base
        rows.append({"backbone": name, "variant": "tiny" if tiny else "full", "preset": preset, "device": device,
                     "dtype": "bf16-autocast" if device == "cuda" else "fp32", "layout": layout,
                     "input": f"{batch}x{model.in_channels}x{t}x{h}x{w}", "feature_dim": model.feature_dim,
                     "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                     "clips_per_s": round(rate, 2), "peak_mib": round(peak / 2**20, 1)})
        del model, clips
    if len(rows) == 2:
        max(rows, key=lambda r: r["clips_per_s"])["layout"] += " (faster)"
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="clips per forward on CPU")
    parser.add_argument("--gpu-batch", type=int, default=8, help="clips per forward on GPU")
    parser.add_argument("--iters", type=int, default=3, help="timed forwards per measurement")
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--only", help="comma-separated families (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    families = args.only.split(",") if args.only else list(FAMILIES)
    runs = [("cpu", args.batch)]
    if torch.cuda.is_available() and not args.cpu_only:
        runs.append(("cuda", args.gpu_batch))
    rows = []
    for device, batch in runs:
        for name in families:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                rows += pool.submit(bench_family, name, device, batch, args.iters).result()
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "gpu": torch.cuda.get_device_name() if len(runs) > 1 else None, "rows": rows}))
        return 0
    cols = ("backbone", "variant", "device", "dtype", "layout", "input", "feature_dim", "params_m", "clips_per_s",
            "peak_mib")
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols] if rows else [len(c) for c in cols]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if len(runs) > 1 else ", no GPU"))
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
