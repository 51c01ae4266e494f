"""Bytes per keyframe of the keyframe store: raw, and as the store writes it with each compression.

One keyframe record of a preset (default ``ava_slowfast_r50``: 2304-channel map at stride 16 plus 2304 x 32
context tokens) is computed on a clip of a real video (``--video``; default a generated textured clip),
written through the zarr store with ``compression`` none / zstd / lz4 (bitshuffled blosc), and its chunk
bytes counted, with the write and whole-record read time of each.

Without ``--weights`` the full-size backbone is randomly initialised (seeded): its post-ReLU maps have
the layout and sparsity structure of a trained one but not its statistics, so treat the compressed
figures as indicative; with the public checkpoint they are the real ones.

    python bench/keyframe_bytes.py [--video V.mp4] [--weights SLOWFAST_8x8_R50.pyth] [--size 256x340]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from extractors.decoding import DecodeSpec, decode_video  # noqa: E402
from extractors.outputs import KeyframeMaps  # noqa: E402
from extractors.preprocess import FramePreprocessor  # noqa: E402
from extractors.presets import resolve_preset  # noqa: E402
from extractors.registry import build_backbone  # noqa: E402
from extractors.samplers import KeyframeSampler  # noqa: E402
from pipeline.store import create_store  # noqa: E402


def clip_from_video(path: str, preset, spec) -> torch.Tensor:
    """The preset's clip centred on the middle of the video, preprocessed: (3, T, H, W)."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        seconds = float(s.frames / s.average_rate) if s.frames else 2.0
    events = list(decode_video(path, spec, KeyframeSampler(preset.clip_len, preset.frame_interval, (seconds / 2,))))
    plan = next(e[2] for e in events if e[0] == "meta")
    frames = np.concatenate([e[2] for e in events if e[0] == "frames"])
    x = FramePreprocessor(preset, torch.device("cpu"))(frames)[torch.from_numpy(plan.clips[0])]
    return x.permute(1, 0, 2, 3)


def generated_clip(preset, height: int, width: int) -> torch.Tensor:
    """Smooth textures with objects moving over them (no video at hand)."""
    rng = np.random.default_rng(0)
    t = preset.clip_len
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * xx + 3 * c) * np.cos(4 * yy + c) for c in range(3)], -1)
    frames = np.empty((t, height, width, 3), np.uint8)
    for i in range(t):
        img = 0.5 + 0.3 * base + 0.05 * rng.normal(size=base.shape)
        for k in range(4):
            y0 = int((0.2 + 0.15 * k) * height)
            x0 = int((0.1 + 0.2 * k + 0.01 * i) * width) % (width - 40)
            img[y0:y0 + 60, x0:x0 + 30] = (0.2 * k, 0.8 - 0.2 * k, 0.5)
        frames[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return FramePreprocessor(preset, torch.device("cpu"))(frames).permute(1, 0, 2, 3)


def chunk_bytes(record_dir: Path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(record_dir)
               for f in files if f != "zarr.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ava_slowfast_r50")
    p.add_argument("--video", help="a real video (a clip centred on its middle is used)")
    p.add_argument("--weights", help="the backbone's checkpoint (default: seeded random init)")
    p.add_argument("--size", default="256x340", help="network input HxW: short side H, centre crop to W")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.split("x"))
    preset = resolve_preset({"preset": args.preset, "size": height, "crop": [height, width]})
    spec = DecodeSpec.from_preset(preset, decoders=("pyav",))
    clip = clip_from_video(args.video, preset, spec) if args.video else generated_clip(preset, height, width)
    model = build_backbone(preset.backbone, **preset.backbone_kwargs, **({"weights": args.weights} if args.weights
                                                                          else {}))
    t0 = time.perf_counter()
    with torch.inference_mode():
        fmap, context = model.forward_keyframe(clip[None])
    forward_s = time.perf_counter() - t0
    record = {"map": fmap[0].numpy(), "context": context[0].numpy()}
    half = {k: v.astype(np.float16) for k, v in record.items()}
    raw = {k: v.nbytes for k, v in half.items()}
    source = args.video or "generated textured clip"
    weights = args.weights or "random init (seeded)"
    print(f"{args.preset}: input {clip.shape[1]}x{height}x{width} from {source}; weights: {weights}; "
          f"CPU float32 forward {forward_s:.1f} s ({torch.get_num_threads()} threads)")
    print(f"map {tuple(half['map'].shape)}  context {tuple(half['context'].shape)}  float16; "
          f"zeros in map {np.mean(half['map'] == 0):.1%}, in context {np.mean(half['context'] == 0):.1%}")
    print(f"raw: map {raw['map'] / 2**10:.1f} KiB + context {raw['context'] / 2**10:.1f} KiB = "
          f"{sum(raw.values()) / 2**20:.3f} MiB per keyframe")
    attrs = {"index": "keyframe", "fields": KeyframeMaps.fields, "feature_dim": int(half["map"].shape[0])}
    print(f"{'compression':<12} {'bytes/keyframe':>15} {'ratio':>6} {'write ms':>9} {'read ms':>8}")
    with tempfile.TemporaryDirectory() as tmp:       # the first write pays for zarr's imports: untimed
        create_store(Path(tmp), "zarr", "float16", attrs).write("video,0901", half)
    for compression in ("none", "zstd", "lz4"):
        with tempfile.TemporaryDirectory() as tmp:
            store = create_store(Path(tmp), "zarr", "float16", attrs, compression=compression)
            t0 = time.perf_counter()
            store.write("video,0902", half)
            write_ms = (time.perf_counter() - t0) * 1e3
            size = chunk_bytes(store.path / "video,0902")
            t0 = time.perf_counter()
            for _ in range(5):
                store.read("video,0902", raw=True)
            read_ms = (time.perf_counter() - t0) * 1e3 / 5
            store.close()
        print(f"{compression:<12} {size:>15,d} {sum(raw.values()) / size:>6.2f} {write_ms:>9.1f} {read_ms:>8.1f}")


if __name__ == "__main__":
    main()
