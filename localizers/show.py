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
    p.add_argument("--plot", type=Path, metavar="FILE", help="timeline of one video over its features "
                                                             "(.png, .pdf or .svg)")
    p.add_argument("--plot-pr", type=Path, metavar="FILE", help="precision-recall curves per class and tIoU")
    p.add_argument("--min-score", type=float, default=0.05, help="hide predictions below this score")
    p.add_argument("--top-k", type=int, default=10, help="timeline: the K best predictions, with their scores")
    p.add_argument("--classes", help="comma-separated classes to draw (default: timeline: the classes in the "
                                     "video's ground truth or top predictions; PR: up to 12 with the most ground truth)")
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
        _pr(eval_dir, dataset, gt, detections, args.plot_pr, plots, args.classes)
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
    ranked = sorted(detections.get(video, []), key=lambda d: -d["score"])
    # a point event ("timestamp") as the segment [t, t], as the annotations hold it
    predicted = [(d["label"], float(d["score"]), *(map(float, d["segment"]) if "segment" in d else
                                                    (float(d["timestamp"]),) * 2))
                 for d in ranked if d["score"] >= args.min_score][:args.top_k]
    # only the classes this video is about: an ActivityNet timeline of 200 rows was 12518 px tall
    shown = _pick_classes(args.classes, gt.classes) or \
        [c for c in gt.classes if c in {t[0] for t in truth} | {p[0] for p in predicted}]
    plots.draw_timeline(args.plot, video, ann.duration, shown, [t for t in truth if t[0] in shown],
                        [p for p in predicted if p[0] in shown], features, times)


def _pick_classes(spec: str | None, known) -> list[str] | None:
    if not spec:
        return None
    wanted = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise ConfigError(f"{PROG}: --classes: {', '.join(unknown)} not in the annotations' classes")
    return wanted


def _evaluate(gt, detections, metrics: dict, subset: str | None):
    """The detections scored again as ``metrics`` (a metrics.json) scored them: tIoU or time tolerances."""
    from localizers.anet_map import evaluate_detections
    from localizers.point_map import evaluate_points

    if "tolerances" in metrics:
        return evaluate_points(gt, detections, subset=subset, tolerances=metrics["tolerances"], only_videos=detections)
    return evaluate_detections(gt, detections, subset=subset, tious=metrics["tious"], only_videos=detections)


def _pr(eval_dir: Path, dataset, gt, detections, path: Path, plots, classes: str | None) -> None:
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    result = _evaluate(gt, detections, metrics, (dataset.splits or {}).get("test"))
    names = _pick_classes(classes, result.classes) or _most_annotated(result)
    keep = [result.classes.index(c) for c in names]
    curves = result.pr_curves()
    points = "tolerances" in metrics
    plots.draw_pr_curves(path, {c: curves[c] for c in names}, result.tolerances if points else result.tious,
                         result.ap[:, keep], tolerances=points)


def _most_annotated(result, limit: int = 12) -> list[str]:
    """Up to ``limit`` classes, those with the most ground truth, in annotation order (a bounded figure)."""
    order = sorted(range(len(result.classes)), key=lambda k: -int(result.n_gt[k]))[:limit]
    if len(result.classes) > limit:
        print(f"{PROG}: drawing {limit} of {len(result.classes)} classes (most ground truth); --classes picks "
              f"others", file=sys.stderr)
    return [result.classes[k] for k in sorted(order)]


def compare_plot(argv: list[str], cmd) -> int:
    """`pipeline compare A B --plot FILE`: the PR curves of localize_eval runs, one panel per class,
    one curve per run at the middle tIoU threshold."""
    p = CommandParser(prog="pipeline compare-plot localize_eval", description=compare_plot.__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=DIR", help="a localize_eval output")
    p.add_argument("--classes")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"{PROG}: matplotlib is not installed; {INSTALL_HINT}", file=sys.stderr)
        return 2
    from localizers import plots
    from pipeline.annotations import load_temporal

    results = {}
    for spec in args.run:
        label, _, d = spec.partition("=")
        metrics = json.loads((Path(d) / "metrics.json").read_text())
        if "annotations" not in metrics:
            raise ConfigError(f"{d}: metrics.json predates compare plots; rerun the evaluation (--force)")
        detections = json.loads((Path(d) / "detections.json").read_text())["results"]
        results[label] = _evaluate(load_temporal(metrics["annotations"]), detections, metrics, metrics["subset"])
    first = next(iter(results.values()))
    if len({type(r) for r in results.values()}) > 1:
        raise ConfigError("pipeline compare --plot: the runs score segments and point events: no common curve")
    names = _pick_classes(args.classes, first.classes) or _most_annotated(first)
    mid = len(first.ap) // 2
    plots.draw_pr_compare(args.out, names, {label: r for label, r in results.items()}, mid)
    print(f"wrote {args.out}")
    return 0
