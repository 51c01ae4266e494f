"""`pipeline evaluate localize --annotations GT --detections PRED.json [--subset S] [--tiou ...] [--json]`.

Scores any ActivityNet-format submission (`{"results": {video: [{"label", "score", "segment"}]}}`)
against temporal annotations; with point-event annotations (`timestamp`), detections
`{"label", "score", "timestamp"}` by the spotting mAP at `--tolerance` seconds instead of tIoU.
No torch: evaluating is a few hundred milliseconds and must stay so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.cli_args import CommandParser
from pipeline.errors import ConfigError

PROG = "pipeline evaluate localize"


def _parser() -> CommandParser:
    p = CommandParser(prog=PROG, description="ActivityNet detection mAP of a submission file.")
    p.add_argument("--annotations", required=True, type=Path,
                   help="ActivityNet-style JSON, or a folder of official THUMOS14 <Class>_<val|test>.txt files")
    p.add_argument("--detections", required=True, type=Path,
                   help='submission JSON: {"results": {video: [{"label", "score", "segment": [s, e]}]}}')
    p.add_argument("--subset", default=None,
                   help="evaluate the videos of this subset only (case-insensitive; default: all)")
    p.add_argument("--tiou", default=None,
                   help="thresholds, start:stop:step (np.linspace values, as the official evaluator) or a "
                        "comma list; THUMOS14 0.3:0.7:0.1 (default), ActivityNet 0.5:0.95:0.05")
    p.add_argument("--tolerance", default=None,
                   help="point events: time tolerances in seconds, a comma list (default 1,2,5); "
                        "refused for segments")
    p.add_argument("--only-detected", action="store_true",
                   help="evaluate only the videos that have detections (e.g. a run on part of the features); "
                        "by default the ground truth of every other video counts as missed")
    p.add_argument("--name", default=None,
                   help="what the table calls the ground truth (default: the annotation file's name)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def read_detections(path: Path) -> dict:
    """The `results` mapping of a submission file; ConfigError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: detections file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise ConfigError(f'{path}: expected a submission object {{"results": {{video: [detections]}}}}')
    return results


def evaluate(argv: list[str], cmd=None) -> int:
    """Entry of `pipeline evaluate localize`; `cmd` (the CLI's CommandContext) is not needed here."""
    from localizers.anet_map import THUMOS_TIOUS, evaluate_detections
    from localizers.point_map import TOLERANCES_S, evaluate_points, parse_tolerances
    from pipeline.annotations import load_temporal

    args = _parser().parse_args(argv)
    tolerances = parse_tolerances(args.tolerance) if args.tolerance is not None else None
    gt = load_temporal(args.annotations)
    if tolerances is not None and not gt.points:
        raise ConfigError(f"--tolerance: {args.annotations} has segments, scored at tIoU thresholds (--tiou)")
    if args.tiou is not None and gt.points:
        raise ConfigError(f"--tiou: {args.annotations} has point events, scored at time tolerances (--tolerance)")
    detections = read_detections(args.detections)
    name = args.name or (args.annotations.name if args.annotations.is_dir() else args.annotations.stem)
    only = detections if args.only_detected else None
    if gt.points:
        result = evaluate_points(gt, detections, subset=args.subset, tolerances=tolerances or TOLERANCES_S,
                                 source=str(args.detections), only_videos=only, dataset=name)
    else:
        result = evaluate_detections(gt, detections, subset=args.subset, tious=args.tiou or THUMOS_TIOUS,
                                     source=str(args.detections), only_videos=only, dataset=name)
    for note in result.notes():
        hint = ("; --only-detected evaluates only those" if "detections cover" in note and not args.only_detected
                else "")
        print(f"{PROG}: warning: {note}{hint}", file=sys.stderr)
    if args.json:
        out = {"annotations": str(args.annotations), "detections": str(args.detections), "subset": args.subset}
        out.update(result.to_json())
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(result.table())
    return 0
