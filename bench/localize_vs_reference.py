"""Our ActionFormer against the reference (PyPI `actionformer==1.5.0`, a fork of the official code) on CPU.

One run: a synthetic THUMOS-sized feature set (the lengths of real THUMOS14 videos by default) in the reference's format (per-video `<id>.npy` (T, 2048)
float32 + ActionFormer JSON), then each side in its own process (so peak memory is its own): train with
the same thumos_i3d configuration and the same epochs, detect on the test videos, and evaluate. Both
detection sets are scored by both evaluators (numbers must be identical; times compared).

The two processes take turns (interleaved): each waits for the driver before every epoch and before its
detection, so both see the same machine state within minutes of each other; on a shared machine the
ratios (wall and CPU) are the figures to read, not the seconds. ``--contention`` adds a busy-loop process
pinned to one core for the whole run (a user's busy box); ours then picks its thread count itself (as the
localize stage does: ``pipeline.threads.choose_threads``), the reference keeps torch's default.

Targets (issues #6, #14): our training time per epoch <= 0.5x the reference's (fp32, on a CPU without
AMX too), peak memory no higher, mAP within 1 point, our evaluator >= 20x faster with identical numbers;
under contention no 5-10x collapse (ours <= 0.5x the reference's there too).

The reference lives in its own virtual environment (never in this repository), e.g.:
    python -m venv bench/.ref-venv
    bench/.ref-venv/bin/pip install torch==2.13.0 numpy pyyaml h5py pandas joblib scipy tqdm setuptools wheel
    bench/.ref-venv/bin/pip install --no-deps --no-build-isolation actionformer==1.5.0   # compiles nms_1d_cpu
Its console scripts crash on CPU (torch.cuda.synchronize, storage.cuda), so a small driver in this
file drives its library instead (`--side reference`, run by the venv's python).

    python bench/localize_vs_reference.py --quick            # 6 train / 4 test videos, 1 + 1 epochs
    python bench/localize_vs_reference.py --size mid         # 40 / 20 videos of THUMOS14's lengths, 1 + 1 epochs
    python bench/localize_vs_reference.py --size mid --lengths uniform   # ... of 300-6000 steps instead
    python bench/localize_vs_reference.py --size mid --contention   # the same beside a busy core
    python bench/localize_vs_reference.py                    # 200 / 210 videos, 5 + 30 epochs (hours)
    python bench/localize_vs_reference.py --warmup-epochs 1 --epochs 1   # full size, 2 epochs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from machine import cpu_summary  # noqa: E402
FPS, STRIDE, CLIP = 30.0, 4, 16  # THUMOS14 I3D features: 16-frame clips every 4 frames at 30 fps
DIM, N_CLASSES = 2048, 20
SIZES = {  # name: (train videos, test videos, min and max steps (--lengths uniform), warm-up epochs, cosine epochs)
    "quick": (6, 4, 300, 1200, 1, 1),
    "mid": (40, 20, 300, 6000, 1, 1),
    "full": (200, 210, 300, 6000, 5, 30),
}
TIOUS = tuple(np.linspace(0.3, 0.7, 5))


# ----------------------------------------------------------------------------- data
def thumos14_steps(n_train: int, n_test: int, seed: int = 0) -> list[int]:
    """Feature steps of real THUMOS14 videos (the embedded annotation file's durations at 30 fps, stride
    4): ``n_train`` of its 200 validation videos (ActionFormer's training split), ``n_test`` of its 212
    test videos, each drawn without replacement in a seeded order. Mean 1527 steps for validation (median
    1129; 15 % longer than the 2304-step training crop)."""
    gt = json.loads((ROOT / "data/annotations/thumos14/thumos14.json").read_text())["database"]
    rng = np.random.default_rng(seed)
    steps = []
    for subset, n in (("Validation", n_train), ("Test", n_test)):
        lengths = sorted(round(v["duration"] * v["fps"] / STRIDE) for v in gt.values() if v["subset"] == subset)
        if n > len(lengths):
            raise SystemExit(f"THUMOS14 has {len(lengths)} {subset} videos, asked for {n}")
        steps += [lengths[i] for i in rng.permutation(len(lengths))[:n]]
    return steps


def make_dataset(folder: Path, n_train: int, n_test: int, min_len: int, max_len: int, seed: int = 0,
                 lengths: str = "uniform") -> Path:
    """Features: N(0, 1) noise plus a class prototype inside each action; actions of 2-20 s. Video
    lengths: ``thumos14`` (:func:`thumos14_steps`) or ``uniform`` in [min_len, max_len]."""
    ann_path = folder / "annotations.json"
    if ann_path.exists():
        return ann_path
    feat_dir = folder / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((N_CLASSES, DIM)).astype(np.float32)
    real = thumos14_steps(n_train, n_test, seed) if lengths == "thumos14" else None
    database = {}
    for i in range(n_train + n_test):
        subset = "Validation" if i < n_train else "Test"
        vid = f"video_{subset.lower()}_{i:07d}"
        steps = real[i] if real else int(rng.integers(min_len, max_len + 1))
        duration = (steps * STRIDE + CLIP / 2) / FPS
        feats = rng.standard_normal((steps, DIM), dtype=np.float32)
        anns = []
        for _ in range(int(rng.integers(1, 9))):
            c = int(rng.integers(N_CLASSES))
            length = float(rng.uniform(2.0, 20.0))
            start = float(rng.uniform(0.0, max(duration - length, 0.5)))
            end = min(start + length, duration)
            a, b = (int(round(t * FPS / STRIDE - CLIP / (2 * STRIDE))) for t in (start, end))
            feats[max(a, 0):max(b, 1)] += prototypes[c]
            anns.append({"label": f"class_{c:02d}", "label_id": c, "segment": [round(start, 2), round(end, 2)]})
        np.save(feat_dir / f"{vid}.npy", feats)
        database[vid] = {"subset": subset, "duration": round(duration, 3), "fps": FPS, "annotations": anns}
    # every class must appear in the test ground truth (the reference mislabels predictions otherwise)
    test_ids = [v for v in database if database[v]["subset"] == "Test"]
    for c in range(N_CLASSES):
        vid = test_ids[c % len(test_ids)]
        if not any(a["label_id"] == c for v in test_ids for a in database[v]["annotations"]):
            database[vid]["annotations"].append({"label": f"class_{c:02d}", "label_id": c, "segment": [0.5, 3.0]})
            feats = np.load(feat_dir / f"{vid}.npy")
            feats[0:int(3.0 * FPS / STRIDE)] += prototypes[c]
            np.save(feat_dir / f"{vid}.npy", feats)
    tmp = ann_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": "synthetic-thumos", "database": database}))
    os.replace(tmp, ann_path)
    return ann_path


def make_eval_set(folder: Path, per_video: int = 200, seed: int = 0) -> None:
    """THUMOS14-sized detections for the evaluators: the real test ground truth, `per_video` detections
    per video (jittered copies of the ground truth, some relabelled, the rest random)."""
    gt = json.loads((ROOT / "data/annotations/thumos14/thumos14.json").read_text())
    (folder / "eval_gt.json").write_text(json.dumps(gt))
    rng = np.random.default_rng(seed)
    labels = sorted({a["label"] for v in gt["database"].values() for a in v["annotations"]})
    results = {}
    for vid, v in gt["database"].items():
        if v["subset"] != "Test":
            continue
        dets = []
        for a in v["annotations"][:per_video // 2]:
            s, e = a["segment"]
            jitter = rng.normal(0, 0.15 * (e - s), 2)
            label = a["label"] if rng.random() < 0.8 else labels[int(rng.integers(len(labels)))]
            dets.append((label, float(rng.random()), s + jitter[0], max(e + jitter[1], s + jitter[0])))
        while len(dets) < per_video:
            s = float(rng.uniform(0, v["duration"]))
            dets.append((labels[int(rng.integers(len(labels)))], float(rng.random()) * 0.5, s,
                         s + float(rng.uniform(0.5, 15))))
        results[vid] = [{"label": lab, "score": sc, "segment": [a, b]} for lab, sc, a, b in dets]
    (folder / "eval_detections.json").write_text(json.dumps({"results": results}))


def reference_python() -> str:
    found = next((str(p) for p in (ROOT / "bench/.ref-venv/bin/python", Path("/tmp/afref/venv/bin/python"))
                  if p.exists()), None)
    if found is None:
        raise SystemExit("no reference venv: see the docstring of bench/localize_vs_reference.py (or pass --ref-python)")
    return found


class Turn:
    """A side's half of the interleaving: wait for the driver's go (a line on stdin) before each timed
    phase, say done (a JSON line on the channel, the process's original stdout) after it."""

    channel = sys.stdout  # main() moves everything else printed on stdout (the libraries') to stderr

    def wait(self) -> None:
        if not sys.stdin.readline():
            raise SystemExit("the driver went away")

    def done(self, payload: dict | None = None) -> None:
        print(json.dumps(payload or {"done": True}), file=self.channel, flush=True)


def _set_threads(torch, wanted: str) -> str:
    """``auto``: the localize stage's choice (pipeline.threads); ``default``: torch's own; else a number."""
    if wanted == "default":
        return "torch default"
    if wanted == "auto":
        from pipeline.threads import choose_threads

        n, why = choose_threads(None)
    else:
        n, why = int(wanted), "as set"
    torch.set_num_threads(n)
    return why


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- our side
class _NpySource:
    """Reads crops straight from the .npy files (memory-mapped), as a feature store would."""

    def __init__(self, folder: Path):
        self.folder = folder

    def read(self, vid, start=None, stop=None):
        return np.asarray(np.load(self.folder / f"{vid}.npy", mmap_mode="r")[start:stop], dtype=np.float32)


def run_ours(args) -> dict:
    import torch

    from localizers.actionformer import video_detections
    from localizers.config import resolve
    from localizers.data import make_item
    from localizers.train import fit, use_bf16
    from pipeline.annotations import load_temporal
    from pipeline.timemap import TimeGrid

    work = Path(args.workdir)
    gt = load_temporal(work / "annotations.json")
    label_index = gt.label_index()
    cfg = resolve({"preset": "thumos_i3d", "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
                   "precision": args.precision}).with_dims(DIM, len(gt.classes))
    grid = TimeGrid(fps=FPS, stride=STRIDE, clip_len=CLIP)
    source = _NpySource(work / "features")

    def item(vid, v, check_segments=True):
        shape = np.load(work / "features" / f"{vid}.npy", mmap_mode="r").shape
        return make_item(vid, shape, grid, v.duration, v.segments, v.labels, label_index, DIM,
                         cfg.model.strides[-1], where=str(work / "annotations.json"), check_segments=check_segments)

    train = [item(vid, v) for vid, v in gt.subset("validation").items()]
    test = [item(vid, v, check_segments=False) for vid, v in gt.subset("test").items()]
    out_dir = work / "ours_train"
    for f in out_dir.glob("*"):
        if f.is_file():
            f.unlink()
    why = _set_threads(torch, args.threads)
    turn = Turn()
    epoch_cpu, started = [], []

    def log(message: str) -> None:  # after each epoch (its checkpoint written): the other side's turn
        print(message, file=sys.stderr)
        if message.startswith("localize: epoch"):
            epoch_cpu.append(time.process_time() - epoch_cpu.pop())
            turn.done({"wall_s": time.perf_counter() - started.pop(), "cpu_s": epoch_cpu[-1]})
            turn.wait()
            started.append(time.perf_counter())
            epoch_cpu.append(time.process_time())

    torch.manual_seed(0)
    turn.wait()
    started.append(time.perf_counter())
    epoch_cpu.append(time.process_time())
    result = fit(cfg, train, source, out_dir, device="cpu", log=log)
    model = result.ema if args.weights == "ema" else result.model
    model.eval()
    t0 = time.perf_counter()
    detections = {it.id: video_detections(model, source, it, cfg.test, gt.classes) for it in test}
    infer_s = time.perf_counter() - t0
    (work / "ours_detections.json").write_text(json.dumps({"results": detections}))
    return {"epoch_s": result.seconds_per_epoch, "epoch_cpu_s": epoch_cpu[:result.epochs_run], "infer_s": infer_s,
            "peak_rss_mb": _peak_rss_mb(), "precision": "bf16" if use_bf16(cfg.train.precision, torch.device("cpu"))
            else "fp32", "threads": torch.get_num_threads(), "threads_why": why}


# ----------------------------------------------------------------------------- reference side
def _reference_config(work: Path, args) -> dict:
    import copy

    from actionformer.core.config import DEFAULTS, _update_config

    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(dataset_name="thumos", train_split=["validation"], val_split=["test"], devices=["cpu"])
    cfg["dataset"].update(json_file=str(work / "annotations.json"), feat_folder=str(work / "features"),
                          file_prefix="", file_ext=".npy", num_classes=N_CLASSES, input_dim=DIM,
                          feat_stride=STRIDE, num_frames=CLIP, default_fps=None, trunc_thresh=0.5,
                          crop_ratio=[0.9, 1.0], max_seq_len=2304)
    cfg["model"].update(fpn_type="identity", max_buffer_len_factor=6.0, backbone_arch=(2, 2, 5), n_mha_win_size=19)
    cfg["opt"].update(learning_rate=1e-4, epochs=args.epochs, warmup_epochs=args.warmup_epochs, weight_decay=0.05)
    cfg["loader"].update(batch_size=2, num_workers=0)
    cfg["train_cfg"].update(init_loss_norm=100, clip_grad_l2norm=1.0, cls_prior_prob=0.01,
                            center_sample="radius", center_sample_radius=1.5)
    cfg["test_cfg"].update(voting_thresh=0.7, pre_nms_topk=2000, max_seg_num=200, min_score=0.001,
                           multiclass_nms=True)
    return _update_config(cfg)


def run_reference(args) -> dict:
    import torch

    from actionformer.datasets import make_dataset as af_dataset
    from actionformer.datasets.data_utils import trivial_batch_collator
    from actionformer.modeling import make_meta_arch
    from actionformer.utils import ModelEma, fix_random_seed, make_optimizer, make_scheduler

    work = Path(args.workdir)
    cfg = _reference_config(work, args)
    generator = fix_random_seed(cfg["init_rand_seed"], include_cuda=False)
    train_set = af_dataset(cfg["dataset_name"], True, cfg["train_split"], **cfg["dataset"])
    cfg["model"]["train_cfg"]["head_empty_cls"] = train_set.get_attributes()["empty_label_ids"]
    # its make_data_loader sets persistent_workers=True, which needs >= 1 worker: same loader, 0 workers
    loader = torch.utils.data.DataLoader(train_set, batch_size=2, num_workers=0, collate_fn=trivial_batch_collator,
                                         shuffle=True, drop_last=True, generator=generator)
    model = make_meta_arch(cfg["model_name"], **cfg["model"])
    optimizer = make_optimizer(model, cfg["opt"])
    scheduler = make_scheduler(optimizer, cfg["opt"], len(loader))
    ema = ModelEma(model)
    why = _set_threads(torch, args.threads)
    turn = Turn()
    epoch_s, epoch_cpu = [], []
    test_set = af_dataset(cfg["dataset_name"], False, cfg["val_split"], **cfg["dataset"])
    for epoch in range(args.warmup_epochs + args.epochs):
        model.train()
        turn.wait()
        t0, c0 = time.perf_counter(), time.process_time()
        for video_list in loader:  # train_one_epoch without its torch.cuda.synchronize()
            optimizer.zero_grad(set_to_none=True)
            losses = model(video_list)
            losses["final_loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["train_cfg"]["clip_grad_l2norm"])
            optimizer.step()
            scheduler.step()
            ema.update(model)
        epoch_s.append(time.perf_counter() - t0)
        epoch_cpu.append(time.process_time() - c0)
        print(f"reference: epoch {epoch + 1} loss {float(losses['final_loss']):.4f} {epoch_s[-1]:.1f}s",
              file=sys.stderr)
        turn.done({"wall_s": epoch_s[-1], "cpu_s": epoch_cpu[-1]})

    turn.wait()
    net = ema.module if args.weights == "ema" else model
    net.eval()
    names = {i: name for name, i in train_set.label_dict.items()}
    t0 = time.perf_counter()
    detections = {}
    with torch.no_grad():
        for k in range(len(test_set)):
            out = net([test_set[k]])[0]
            detections[out["video_id"]] = [
                {"label": names[int(c)], "score": float(s), "segment": [float(a), float(b)]}
                for (a, b), s, c in zip(out["segments"].tolist(), out["scores"].tolist(), out["labels"].tolist())]
    infer_s = time.perf_counter() - t0
    (work / "reference_detections.json").write_text(json.dumps({"results": detections}))
    peak = _peak_rss_mb()

    return {"epoch_s": epoch_s, "epoch_cpu_s": epoch_cpu, "infer_s": infer_s, "peak_rss_mb": peak,
            "precision": "fp32", "threads": torch.get_num_threads(), "threads_why": why,
            **run_reference_evaluator(args)}  # after ours' detection (the driver's order): both sets


def run_reference_evaluator(args) -> dict:
    """Its evaluator, single worker (its fastest setting on 2 cores), on the detection sets present: both
    of this run's, and the THUMOS14-sized set (real test ground truth, 200 detections per video)."""
    from actionformer.utils import ANETdetection

    work = Path(args.workdir)
    sets = {"reference": (work / "annotations.json", work / "reference_detections.json"),
            "ours": (work / "annotations.json", work / "ours_detections.json"),
            "thumos14": (work / "eval_gt.json", work / "eval_detections.json")}
    return {"evaluator": {name: _reference_evaluate(ANETdetection, gt, dets)
                          for name, (gt, dets) in sets.items() if dets.exists()}}


def _reference_evaluate(ANETdetection, gt_path: Path, dets_path: Path) -> dict:
    label_ids = {a["label"]: a["label_id"] for v in json.loads(gt_path.read_text())["database"].values()
                 for a in v["annotations"]}
    results = json.loads(dets_path.read_text())["results"]
    rows = [(vid, d["segment"][0], d["segment"][1], label_ids[d["label"]], d["score"])
            for vid, ds in results.items() for d in ds]
    preds = {"video-id": [r[0] for r in rows], "t-start": np.array([r[1] for r in rows]),
             "t-end": np.array([r[2] for r in rows]), "label": np.array([r[3] for r in rows], dtype=np.int64),
             "score": np.array([r[4] for r in rows])}
    t0, c0 = time.perf_counter(), time.process_time()
    evaluator = ANETdetection(str(gt_path), "test", tiou_thresholds=np.array(TIOUS), num_workers=1)
    mAP, avg, _ = evaluator.evaluate(preds, verbose=False)
    total_s, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    frame = _frame(preds, evaluator)
    c0 = time.process_time()
    evaluator.wrapper_compute_average_precision(frame)
    ap_only_cpu = time.process_time() - c0
    return {"mAP": [float(m) for m in mAP], "average_mAP": float(avg), "seconds": total_s, "cpu_s": total_cpu,
            "ap_only_cpu_s": ap_only_cpu, "n_detections": len(rows)}


def _frame(preds, evaluator):
    import pandas as pd

    frame = pd.DataFrame({k: (list(v) if k == "video-id" else v.tolist()) for k, v in preds.items()})
    frame["label"] = frame["label"].replace(evaluator.activity_index)
    return frame


# ----------------------------------------------------------------------------- driver
def _side_cmd(side: str, python: str, args, threads: str) -> tuple[list[str], dict, Path]:
    cmd = [python, str(Path(__file__).resolve()), "--side", side, "--workdir", args.workdir,
           "--epochs", str(args.epochs), "--warmup-epochs", str(args.warmup_epochs), "--weights", args.weights,
           "--precision", args.precision, "--threads", threads]
    env = dict(os.environ, PYTHONPATH=str(ROOT) if side == "ours" else "")  # the reference: its venv only
    return cmd, env, ROOT if side == "ours" else Path(args.workdir)


def run_reference_evaluator_side(python: str, args) -> dict:
    cmd, env, cwd = _side_cmd("reference-evaluator", python, args, "default")
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"reference-evaluator failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_interleaved(ref_python: str, args) -> tuple[dict, dict]:
    """Both sides started at once (data loading and model building overlap, untimed), then turns: epoch
    e of one side, epoch e of the other (who goes first alternates), then ours' detection, then the
    reference's detection and its evaluator (which scores ours' detections too)."""
    work = Path(args.workdir)
    procs, logs = {}, {}
    for side, python, threads in (("ours", sys.executable, args.threads), ("reference", ref_python, args.ref_threads)):
        cmd, env, cwd = _side_cmd(side, python, args, threads)
        logs[side] = open(work / f"{side}_stderr.log", "w")
        procs[side] = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=logs[side], text=True)

    def turn(side: str) -> dict:
        proc = procs[side]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            logs[side].flush()
            tail = (work / f"{side}_stderr.log").read_text()[-4000:]
            raise SystemExit(f"{side} failed ({proc.returncode}):\n{tail}")
        return json.loads(line)

    try:
        for epoch in range(args.warmup_epochs + args.epochs):
            took = {side: turn(side) for side in (("ours", "reference") if epoch % 2 == 0 else ("reference", "ours"))}
            o, r = took["ours"], took["reference"]  # ours' wall here includes its checkpoint write
            print(f"epoch {epoch + 1}: ours {o['wall_s']:.1f} s ({o['cpu_s']:.1f} CPU s), reference {r['wall_s']:.1f} s "
                  f"({r['cpu_s']:.1f} CPU s): ours/ref {o['wall_s'] / r['wall_s']:.3f} wall, "
                  f"{o['cpu_s'] / r['cpu_s']:.3f} CPU; load average {os.getloadavg()[0]:.1f}", flush=True)
        ours, ref = turn("ours"), turn("reference")
    finally:
        for side, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            logs[side].close()
    return ours, ref


@contextmanager
def busy_core(enabled: bool):
    """A busy-loop process pinned to the last CPU this process may use (another user's job), for the block."""
    if not enabled:
        yield None
        return
    cpu = max(os.sched_getaffinity(0))
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        yield cpu
    finally:
        proc.kill()
        proc.wait()


def compare_evaluators(work: Path, ref: dict) -> dict:
    """Our evaluator on every detection set the reference's evaluated; prints times and differences."""
    from localizers.anet_map import evaluate_detections
    from pipeline.annotations import load_temporal

    ann = work / "annotations.json"
    sets = {"reference": (ann, work / "reference_detections.json"), "ours": (ann, work / "ours_detections.json"),
            "thumos14": (work / "eval_gt.json", work / "eval_detections.json")}
    ours_eval = {}
    for name, (gt_path, dets_path) in sets.items():
        if name not in ref["evaluator"]:
            continue
        t0, c0 = time.perf_counter(), time.process_time()  # loading included, as for the reference's evaluator
        gt = load_temporal(gt_path)
        dets = json.loads(dets_path.read_text())["results"]
        result = evaluate_detections(gt, dets, subset="test", tious=TIOUS)
        ours_eval[name] = (result, time.perf_counter() - t0, time.process_time() - c0)

    # both are single-threaded here: CPU seconds compare them even on a busy machine; wall seconds also shown
    print()
    print(f"{'evaluator on the same detections':<42}{'its (s)':>12}{'ours (s)':>12}{'speed-up':>10}  max |diff mAP|")
    labels = {"reference": "this run, reference dets", "ours": "this run, our dets",
              "thumos14": "THUMOS14 test GT, 212 videos"}
    for side, theirs in ref["evaluator"].items():
        result, wall, cpu = ours_eval[side]
        diff = float(np.max(np.abs(np.array(theirs["mAP"]) - result.mAP)))
        print(f"{labels[side] + ', ' + str(theirs['n_detections']) + ' dets':<42}")
        print(f"{'  CPU s, load + mAP (+ its top-k recall)':<42}{theirs['cpu_s']:>12.3f}{cpu:>12.3f}"
              f"{theirs['cpu_s'] / cpu:>10.1f}x  {diff:.1e}")
        print(f"{'  CPU s, its AP part only vs ours all':<42}{theirs['ap_only_cpu_s']:>12.3f}{cpu:>12.3f}"
              f"{theirs['ap_only_cpu_s'] / cpu:>10.1f}x")
        print(f"{'  wall s':<42}{theirs['seconds']:>12.3f}{wall:>12.3f}{theirs['seconds'] / wall:>10.1f}x")
    return ours_eval


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="--size quick: 6 train / 4 test videos, 1 + 1 epochs")
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="quick (minutes), mid (40 / 20 videos, 1 + 1 epochs: tens of minutes "
                        "on 2 cores) or full (200 / 210 videos, 5 + 30 epochs: hours); default full")
    p.add_argument("--lengths", choices=["thumos14", "uniform"], default="thumos14",
                   help="video lengths: thumos14 (default: those of real THUMOS14 videos, from the embedded "
                        "annotations) or uniform (300-6000 steps, as the issue first measured)")
    p.add_argument("--contention", action="store_true",
                   help="a busy-loop process pinned to one core beside both sides for the whole run")
    p.add_argument("--threads", default=None,
                   help="ours' torch threads: a number, or auto (the localize stage's choice); default 2, "
                        "auto with --contention")
    p.add_argument("--report-only", action="store_true",
                   help="print the report of the last run of this size again (from <workdir>/sides*.json)")
    p.add_argument("--ref-threads", default="default",
                   help="the reference's torch threads: a number, or default (torch's: one per core)")
    p.add_argument("--side", choices=["ours", "reference", "reference-evaluator"], help=argparse.SUPPRESS)
    p.add_argument("--evaluators-only", action="store_true",
                   help="only the evaluator comparison on the THUMOS14-sized detection set (seconds)")
    p.add_argument("--workdir", default=None, help="where data and outputs go (default /tmp/localize_bench_<size>)")
    p.add_argument("--ref-python", default=None,
                   help="python of the reference's venv (default bench/.ref-venv/bin/python, else /tmp/afref/venv/bin/python)")
    p.add_argument("--epochs", type=int, default=None, help="cosine epochs (default: 1 quick, 30 full)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="warm-up epochs (default: 1 quick, 5 full)")
    p.add_argument("--weights", choices=["trained", "ema"], default=None,
                   help="weights evaluated (default: ema for the full schedule; trained for short runs, whose "
                        "EMA is still near the initialisation)")
    p.add_argument("--precision", default="auto", help="our localize.precision (auto | fp32 | bf16)")
    args = p.parse_args(argv)
    size = "quick" if args.quick else (args.size or "full")
    if args.threads is None:
        args.threads = "auto" if args.contention else "2"
    n_train, n_test, min_len, max_len, warm, cos = SIZES[size]
    args.epochs = cos if args.epochs is None else args.epochs
    args.warmup_epochs = warm if args.warmup_epochs is None else args.warmup_epochs
    if args.weights is None:
        args.weights = "ema" if args.warmup_epochs + args.epochs >= 20 else "trained"
    args.workdir = args.workdir or f"/tmp/localize_bench_{size}_{args.lengths}"

    if args.side:
        run = {"ours": run_ours, "reference": run_reference, "reference-evaluator": run_reference_evaluator}[args.side]
        if args.side != "reference-evaluator":
            Turn.channel = os.fdopen(os.dup(1), "w")
            os.dup2(2, 1)  # the reference's library prints its progress on stdout
            Turn().done(run(args))
            return 0
        print(json.dumps(run(args)))
        return 0

    ref_python = args.ref_python or reference_python()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.evaluators_only:
        print("evaluators only: THUMOS14 test ground truth, 200 detections per video", flush=True)
    else:
        spread = "THUMOS14's lengths" if args.lengths == "thumos14" else f"{min_len}-{max_len} steps"
        print(f"size: {size} ({n_train} train / {n_test} test videos, {spread} of {DIM}-d features), "
              f"epochs: {args.warmup_epochs} warm-up + {args.epochs} cosine, weights evaluated: {args.weights}, "
              f"workdir {work}", flush=True)
    make_eval_set(work)
    if args.evaluators_only:
        for stale in ("reference_detections.json", "ours_detections.json"):
            (work / stale).unlink(missing_ok=True)
        compare_evaluators(work, run_reference_evaluator_side(ref_python, args))
        return 0
    t0 = time.perf_counter()
    make_dataset(work, n_train, n_test, min_len, max_len, lengths=args.lengths)
    print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    saved = work / f"sides{'_contention' if args.contention else ''}.json"
    if args.report_only:
        ours, ref, load_before, load_after = json.loads(saved.read_text())
    else:
        load_before = os.getloadavg()
        with busy_core(args.contention) as cpu:
            if cpu is not None:
                print(f"contention: a busy-loop process pinned to CPU {cpu}", flush=True)
                time.sleep(2)  # running before either side chooses its threads
            t0 = time.perf_counter()
            ours, ref = run_interleaved(ref_python, args)
        print(f"both done in {time.perf_counter() - t0:.0f} s", flush=True)
        load_after = os.getloadavg()
        saved.write_text(json.dumps([ours, ref, load_before, load_after]))

    ours_eval = compare_evaluators(work, ref)

    def mean_after_first(v):  # the first epoch includes one-off start-up costs
        return float(np.mean(v[1:] if len(v) > 1 else v))

    where = (f"{cpu_summary()}; ours {ours['precision']}, {ours['threads']} threads ({ours['threads_why']}); "
             f"reference {ref['precision']}, {ref['threads']} threads ({ref['threads_why']})"
             + ("; beside a busy-loop process on one core" if args.contention else ""))
    rows = [
        ("training s/epoch (mean after the first)", mean_after_first(ref["epoch_s"]), mean_after_first(ours["epoch_s"]),
         "<= 0.5"),
        ("training s, first epoch", ref["epoch_s"][0], ours["epoch_s"][0], ""),
        ("training CPU s/epoch (mean after the first)", mean_after_first(ref["epoch_cpu_s"]),
         mean_after_first(ours["epoch_cpu_s"]), "<= 0.5"),
        ("peak RSS MB (train + detect)", ref["peak_rss_mb"], ours["peak_rss_mb"], "<= 1"),
        ("detection s (test set)", ref["infer_s"], ours["infer_s"], ""),
    ]
    print()
    print(where)
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after: other processes on the "
          f"machine slow both sides; the sides took turns, so read the ratios")
    print(f"{'':<46}{'reference':>12}{'ours':>12}{'ours/ref':>10}  target  met")
    for name, r, o, target in rows:
        met = ("yes" if o / r <= float(target.split()[-1]) else "NO") if target else ""
        print(f"{name:<46}{r:>12.2f}{o:>12.2f}{o / r:>10.3f}  {target:<7} {met}")
    per = [o / r for o, r in zip(ours["epoch_s"], ref["epoch_s"])]
    per_cpu = [o / r for o, r in zip(ours["epoch_cpu_s"], ref["epoch_cpu_s"])]
    print(f"  per epoch ours/ref, wall: {[round(x, 3) for x in per]}, CPU: {[round(x, 3) for x in per_cpu]}")
    m_ref = ours_eval["reference"][0].average_mAP * 100
    m_ours = ours_eval["ours"][0].average_mAP * 100
    print(f"{'average mAP % (0.3:0.7), reference dets':<46}{m_ref:>12.2f}")
    print(f"{'average mAP % (0.3:0.7), our dets':<46}{'':>12}{m_ours:>12.2f}{m_ours - m_ref:>+10.2f}  "
          f"+-1 pt   {'yes' if abs(m_ours - m_ref) <= 1 else 'NO'}")
    print(f"  mAP per tIoU, reference: {np.round(ours_eval['reference'][0].mAP * 100, 2).tolist()}")
    print(f"  mAP per tIoU, ours:      {np.round(ours_eval['ours'][0].mAP * 100, 2).tolist()}")
    print(f"  epochs (s): ours {[round(x, 1) for x in ours['epoch_s']]}, reference {[round(x, 1) for x in ref['epoch_s']]}")
    summary = {"size": size, "contention": args.contention, "where": where, "load_average": [load_before, load_after],
               "ours": ours, "reference": ref,
               "our_evaluator": {k: {"mAP": r.mAP.tolist(), "seconds": t, "cpu_s": c} for k, (r, t, c) in ours_eval.items()},
               "mAP": {"reference_dets": m_ref, "our_dets": m_ours}}
    (work / "bench_result.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
