"""What optical flow costs in extraction.

1. Flow frames per second of RAFT (tiny, small, large) alone, at the resolution frames leave the
   decoder for the THUMOS preset (short side 256: 256 x 340), ``--iters`` updates, batched consecutive
   pairs (each frame encoded once), float32 on the CPU, and on CUDA when there is one.
2. Extraction of a generated video with two streams (tiny I3D; RAFT tiny, or small at ``--extract-size``):
   the share of the engine's time spent computing flow, decoded frames and flow computations per video
   frame (one decode pass; N - 1 flows for N frames, however much the 16-frame clips at stride 4 overlap).

Timings use random weights (the work does not depend on their values). Prints the CPU model, threads
and precision.

    python bench/flow.py [--height 256 --width 340] [--pairs 4] [--iters 12] [--archs tiny,small,large]
                         [--seconds 8] [--extract-size 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract_overlap import make_video  # noqa: E402
from machine import cpu_model  # noqa: E402

from extractors import raft  # noqa: E402
from extractors.stage import ExtractJob, run_job  # noqa: E402
from pipeline.context import Item  # noqa: E402




def flow_fps(arch: str, device: torch.device, height: int, width: int, pairs: int, iters: int) -> float:
    model = raft.RAFT(arch, iters=iters).eval().to(device)
    frames = torch.rand(pairs + 1, 3, height, width, device=device) * 255
    with torch.inference_mode():
        model.consecutive(frames[:2])                      # warm-up (allocations, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.consecutive(frames)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return pairs / (time.perf_counter() - t0)


def extraction(arch: str, size: int, seconds: float, tmp: Path, device: str) -> dict:
    video = tmp / f"v{size}.mp4"
    if not video.exists():
        make_video(video, seconds, 25, round(size * 16 / 9), size, seed=0)
    params = {"preset": "demo", "size": size, "crop": size, "streams": "both", "store": "zarr",
              "dtype": "float32", "arch": arch, "iters": 12}
    if arch != "tiny":
        weights = tmp / f"raft_{arch}_random.pth"
        torch.save(raft.RAFT(arch).state_dict(), weights)
        params["flow_weights"] = str(weights)
    job = ExtractJob(params, {"batch_size": 8}, tmp / f"out_{arch}_{size}", 1, device)
    stats = run_job(job, [Item("v", video, "fp")], lambda item, rec: None,
                    lambda item, kind, msg: sys.exit(f"{kind}: {msg}"))
    return {"arch": arch, "size": size, "frames": stats.native_frames, "seconds": stats.seconds,
            "flow_share": stats.flow_s / stats.seconds, "decoded_per_frame": stats.decoded_frames / stats.native_frames,
            "flows_per_frame": stats.flow_pairs / stats.native_frames, "flow_pairs": stats.flow_pairs,
            "clips": stats.clips}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=340)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--archs", default="tiny,small,large")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--extract-size", type=int, default=128)
    args = ap.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; precision float32")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"\nRAFT alone, {args.height}x{args.width}, {args.iters} iterations, {args.pairs} pairs per forward")
    for device in devices:
        for arch in args.archs.split(","):
            fps = flow_fps(arch, device, args.height, args.width, args.pairs, args.iters)
            print(f"  {device.type:4s} {arch:5s} {fps:8.2f} flow frames/s")
    print(f"\nextraction, demo preset two-stream (tiny I3D), {args.seconds:g} s at 25 fps")
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            for arch, size in (("tiny", 64), ("small", args.extract_size)):
                r = extraction(arch, size, args.seconds, Path(tmp), device.type)
                print(f"  {device.type:4s} RAFT {r['arch']:5s} {r['size']}px: {r['frames']} frames, {r['clips']} clips "
                      f"in {r['seconds']:.1f} s; flow {100 * r['flow_share']:.0f} % of it; per video frame: "
                      f"{r['decoded_per_frame']:.2f} decoded, {r['flows_per_frame']:.3f} flow computations "
                      f"({r['flow_pairs']} = frames - 1)")


if __name__ == "__main__":
    main()
