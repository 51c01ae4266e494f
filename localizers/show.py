"""`pipeline show localize`: pictures of what the localizer found.

    pipeline show localize --dataset demo --video ID --plot out.png      # timeline over the features
    pipeline show localize --dataset demo --plot-pr out.png              # precision-recall curves

Reads the current outputs of ``localize_eval`` (detections) and ``extract`` (features) for the dataset
and the given ``--set`` overrides; it never runs a stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.cli_args import CommandParser
from pipeline.errors import ConfigError

PROG = "pipeline show localize"
INSTALL_HINT = "pip install 'video-feature-pipeline[plot]'"


def _parser() -> CommandParser:
    p = CommandParser(prog=PROG, description="Plot a video's detections over its features, or PR curves.")
    p.add_argument("--dataset", default="demo", help="manifest name in data/ or path (default: demo)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.PARAM=VALUE",
                   help="the same overrides as the run whose outputs to show")
    p.add_argument("--video", help="video id for --plot (default: the first test video)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="timeline of one video over its features")
    p.add_argument("--plot-pr", type=Path, metavar="PNG", help="precision-recall curves per class and tIoU")
    p.add_argument("--min-score", type=float, default=0.05, help="hide predictions below this score")
    p.add_argument("--json", action="store_true", help="print the written paths as one JSON object")
    return p


def main(argv: list[str], cmd) -> int:
    args = _parser().parse_args(argv)
    if args.plot is None and args.plot_pr is None:
        raise ConfigError(f"{PROG}: nothing to draw; give --plot PNG (with --video) and/or --plot-pr PNG")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"{PROG}: matplotlib is not installed; {INSTALL_HINT}", file=sys.stderr)
        return 2
    from localizers import plots
    from pipeline.annotations import load_temporal

    dataset = cmd.load_dataset(args.dataset)
    eval_dir = cmd.stage_dir("localize_eval", dataset, args.set)
    if eval_dir is None:
        raise ConfigError(f"{PROG}: no localize_eval output for dataset {dataset.name} with these settings; "
                          f"run `pipeline run all --dataset {args.dataset}` first")
    detections = json.loads((eval_dir / "detections.json").read_text())["results"]
    gt = load_temporal(dataset.annotations)
    written = {}
    if args.plot is not None:
        video = args.video or sorted(detections)[0]
        _timeline(cmd, dataset, args, gt, detections, video, plots)
        written["plot"] = str(args.plot)
    if args.plot_pr is not None:
        _pr(eval_dir, dataset, gt, detections, args.plot_pr, plots)
        written["plot_pr"] = str(args.plot_pr)
    if args.json:
        json.dump(written, sys.stdout)
        sys.stdout.write("\n")
    else:
        for path in written.values():
            print(f"wrote {path}")
    return 0


def _timeline(cmd, dataset, args, gt, detections, video: str, plots) -> None:
    from pipeline.store import open_stage_store

    if video not in gt.videos:
        raise ConfigError(f"{PROG}: --video: {video!r} is not in {dataset.annotations}")
    extract_dir = cmd.stage_dir("extract", dataset, args.set)
    if extract_dir is None:
        raise ConfigError(f"{PROG}: no extract output for dataset {dataset.name} with these settings")
    store = open_stage_store(extract_dir)
    try:
        if video not in store:
            raise ConfigError(f"{PROG}: --video: {video!r} has no features in {extract_dir}")
        features = store.read(video)
        times = store.grid(video).centers(len(features))
    finally:
        store.close()
    ann = gt.videos[video]
    truth = [(label, float(s), float(e)) for label, (s, e) in zip(ann.labels, ann.segments)]
    predicted = [(d["label"], float(d["score"]), float(d["segment"][0]), float(d["segment"][1]))
                 for d in detections.get(video, []) if d["score"] >= args.min_score]
    plots.draw_timeline(args.plot, video, ann.duration, gt.classes, truth, predicted, features, times)


def _pr(eval_dir: Path, dataset, gt, detections, path: Path, plots) -> None:
    from localizers.anet_map import evaluate_detections

    tious = json.loads((eval_dir / "metrics.json").read_text())["tious"]
    subset = (dataset.splits or {}).get("test")
    result = evaluate_detections(gt, detections, subset=subset, tious=tious)
    plots.draw_pr_curves(path, result.pr_curves(), result.tious, result.ap)
