"""Feature store I/O benchmark: zarr (this project's store) vs HDF5 vs one .npy per video.

N videos of float16 features, T ~ U[500, 3000], C = 2048 (default N = 500, ~3.6 GB per format).
Measures write (including os.sync), full read of every video, read of 100 random videos, a random
256-step slice of 100 random videos, and bytes on disk; prints a table and the ratios to .npy.
Reads are cold: each file's pages are evicted with posix_fadvise(DONTNEED) before every read phase
(pass --warm to skip that). Formats take turns in each read phase, ``--repeat`` times; the best counts. ``zarr-api`` reads the same zarr store through zarr's own API, for
comparison with the store's direct chunk reads; ``zarr-lz4`` is the compressed variant.

    python bench/store_io.py [--videos 500] [--dir /tmp/store_bench] [--formats npy,zarr,hdf5,zarr-api]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.store import create_store, open_stage_store  # noqa: E402

C = 2048
WINDOW = 256


def make_lengths(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(500, 3001, size=n).tolist()


def make_pool(seed: int, k: int = 4) -> list[np.ndarray]:
    """Feature-like arrays (non-negative, smooth in time, ~37 % zeros); videos are slices of these."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(k):
        x = rng.standard_normal((3000, C), dtype=np.float32)
        x = np.cumsum(x, axis=0) / np.sqrt(np.arange(1, 3001, dtype=np.float32))[:, None]
        pool.append(np.maximum(x - 0.33, 0).astype(np.float16))
    return pool


def video(pool, i: int, t: int) -> np.ndarray:
    return pool[i % len(pool)][:t]


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [Path(r) / f for r, _, fs in os.walk(path) for f in fs]


def evict(path: Path) -> None:
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bytes(path: Path) -> tuple[int, int]:
    files = files_under(path)
    return sum(os.stat(f).st_blocks * 512 for f in files), len(files)


# --- the contenders: write(vids, lengths), read(vid, start, stop) ------------------------------
class Npy:
    name = "npy"

    def __init__(self, root: Path):
        self.root = root / "npy"

    def write(self, pool, lengths):
        self.root.mkdir(parents=True)
        for i, t in enumerate(lengths):
            np.save(self.root / f"v{i:04d}.npy", video(pool, i, t))

    def open(self):
        pass

    def read(self, i, start=None, stop=None):
        path = self.root / f"v{i:04d}.npy"
        if start is None:
            return np.load(path)
        with open(path, "rb") as f:  # the fastest slice of an .npy: parse the header, read only the rows
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            return np.fromfile(f, dtype=dtype, count=(stop - start) * shape[1],
                               offset=start * shape[1] * dtype.itemsize).reshape(-1, shape[1])

    def close(self):
        pass

    @property
    def data_path(self):
        return self.root


class Store:
    def __init__(self, root: Path, backend: str, name: str, compression: str = "none"):
        self.name, self.backend, self.compression = name, backend, compression
        self.dir = root / name
        self.store = None

    def write(self, pool, lengths):
        store = create_store(self.dir, backend=self.backend, attrs={"stride": 4, "clip_len": 16, "fps": 30.0,
                                                                    "feature_dim": C},
                             compression=self.compression)
        for i, t in enumerate(lengths):
            store.write(f"v{i:04d}", video(pool, i, t), {"n_frames": 4 * t + 12})
        store.close()

    def open(self):
        self.store = open_stage_store(self.dir)

    def read(self, i, start=None, stop=None):
        return self.store.read(f"v{i:04d}", start, stop, raw=True)

    def close(self):
        self.store.close()

    @property
    def data_path(self):
        return self.dir


class ZarrApi(Store):
    """Reads the zarr store written by ``Store('zarr')`` through zarr's own array API."""

    def __init__(self, root: Path):
        super().__init__(root, "zarr", "zarr")
        self.name = "zarr-api"

    def write(self, pool, lengths):
        raise RuntimeError("zarr-api only reads")

    def open(self):
        import zarr

        self.group = zarr.open_group(str(self.dir / "features.zarr"), mode="r")

    def read(self, i, start=None, stop=None):
        return self.group[f"v{i:04d}"][start:stop]

    def close(self):
        pass


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args) -> list[dict]:
    root = Path(args.dir)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    lengths = make_lengths(args.videos, args.seed)
    pool = make_pool(args.seed)
    rng = np.random.default_rng(args.seed + 1)
    pick = rng.choice(args.videos, size=min(100, args.videos), replace=False).tolist()
    windows = [(i, int(rng.integers(0, lengths[i] - WINDOW + 1))) for i in pick]
    makers = {"npy": lambda: Npy(root), "zarr": lambda: Store(root, "zarr", "zarr"),
              "hdf5": lambda: Store(root, "hdf5", "hdf5"), "zarr-lz4": lambda: Store(root, "zarr", "zarr-lz4", "lz4"),
              "zarr-api": lambda: ZarrApi(root)}
    contenders = [makers[name]() for name in args.formats.split(",")]
    rows = {c.name: {"format": c.name} for c in contenders}
    for c in contenders:
        if c.name != "zarr-api":
            rows[c.name]["write_s"] = timed(lambda: (c.write(pool, lengths), os.sync()))
        rows[c.name]["bytes"], rows[c.name]["files"] = disk_bytes(c.data_path)
        print(f"  {c.name}: written", file=sys.stderr, flush=True)
    phases = {"full_s": [(i,) for i in range(args.videos)], "rand100_s": [(i,) for i in pick],
              "slice100_s": [(i, s, s + WINDOW) for i, s in windows]}
    # Formats take turns within each phase and repeat; the best time counts, so neither the order
    # nor a burst of other load on the machine decides the comparison.
    for rep in range(args.repeat):
        for phase, reads in phases.items():
            for c in contenders:
                if not args.warm:
                    evict(c.data_path)
                c.open()
                t = timed(lambda: [c.read(*r) for r in reads])
                c.close()
                rows[c.name][phase] = min(t, rows[c.name].get(phase, t))
        print(f"  read round {rep + 1} done", file=sys.stderr, flush=True)
    for c in contenders:  # what was read is what was written
        c.open()
        for i, s in windows[:5]:
            assert np.array_equal(c.read(i, s, s + WINDOW), video(pool, i, lengths[i])[s:s + WINDOW])
        c.close()
    rows = list(rows.values())
    if not args.keep:
        shutil.rmtree(root)
    return rows


def table(rows: list[dict], gb: float) -> str:
    base = next((r for r in rows if r["format"] == "npy"), None)
    head = f"{'format':<10} {'write s':>8} {'full s':>7} {'GB/s':>5} {'rand100 s':>9} {'slice100 ms':>11} {'GB':>6} {'files':>6}"
    lines = [head]
    for r in rows:
        w = f"{r['write_s']:8.2f}" if "write_s" in r else f"{'-':>8}"
        lines.append(f"{r['format']:<10} {w} {r['full_s']:7.2f} {gb / r['full_s']:5.2f} {r['rand100_s']:9.3f} "
                     f"{1000 * r['slice100_s']:11.1f} {r['bytes'] / 1e9:6.2f} {r['files']:6d}")
    if base:
        lines.append("")
        lines.append("ratios to npy (lower is better; targets for zarr: full <= 1.2, rand/slice <= 1.0, bytes <= 1.0)")
        lines.append(f"{'format':<10} {'write':>6} {'full':>6} {'rand100':>8} {'slice100':>9} {'bytes':>6}")
        for r in rows:
            w = f"{r['write_s'] / base['write_s']:6.2f}" if "write_s" in r else f"{'-':>6}"
            lines.append(f"{r['format']:<10} {w} {r['full_s'] / base['full_s']:6.2f} "
                         f"{r['rand100_s'] / base['rand100_s']:8.2f} {r['slice100_s'] / base['slice100_s']:9.2f} "
                         f"{r['bytes'] / base['bytes']:6.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=500)
    p.add_argument("--dir", default="/tmp/store_bench")
    p.add_argument("--formats", default="npy,zarr,hdf5,zarr-api")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=2, help="read rounds; the best time of each counts")
    p.add_argument("--warm", action="store_true", help="do not evict the page cache before reads")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    args = p.parse_args(argv)
    if args.videos < 1:
        p.error("--videos must be >= 1")
    lengths = make_lengths(args.videos, args.seed)
    gb = sum(lengths) * C * 2 / 1e9
    print(f"{args.videos} videos, T~U[500,3000] (mean {np.mean(lengths):.0f}), C={C} float16: {gb:.2f} GB per format; "
          f"reads {'warm' if args.warm else 'cold (posix_fadvise DONTNEED)'}, best of {args.repeat}", flush=True)
    print(table(run(args), gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
