"""`pipeline evaluate detect --annotations GT.csv --detections DET.csv --labelmap LIST.pbtxt
[--exclusions EXCL.csv] [--protocol official|mmaction2] [--json]`: AVA frame-mAP@0.5 of a detections file.

No torch: scoring the validation set is a fraction of a second and must stay so.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from pipeline.cli_args import CommandParser

PROG = "pipeline evaluate detect"


def _parser() -> CommandParser:
    p = CommandParser(prog=PROG, description="AVA frame-mAP@0.5 of a detections file.",
                      json_help="print one JSON object instead of the table")
    p.add_argument("--annotations", required=True, type=Path,
                   help="ground truth: AVA CSV (video_id, timestamp, x1, y1, x2, y2, action_id, person_id)")
    p.add_argument("--detections", required=True, type=Path,
                   help="detections: official CSV (video_id, timestamp, x1, y1, x2, y2, action_id, score)")
    p.add_argument("--labelmap", required=True, type=Path,
                   help="the evaluated classes: AVA pbtxt (id: or label_id:) or mmaction2's label_map.txt")
    p.add_argument("--exclusions", type=Path, default=None,
                   help="excluded keyframes (video_id, timestamp), dropped from both sides")
    p.add_argument("--protocol", choices=("official", "mmaction2"), default="official",
                   help="official (ActivityNet / ACAR-Net calc_mAP: top 50 per keyframe, detections on "
                        "keyframes without GT are false positives) or mmaction2 1.x's variant")
    return p


def evaluate(argv: list[str], cmd=None) -> int:
    """Entry of `pipeline evaluate detect`; `cmd` (the CLI's CommandContext) is not needed here."""
    from detectors.ava_map import evaluate_frame_map, read_detections_csv
    from pipeline.ava import read_boxes, read_exclusions, read_labelmap

    args = _parser().parse_args(argv)
    labelmap = read_labelmap(args.labelmap)
    gt = read_boxes(args.annotations, set(labelmap))
    exclusions = read_exclusions(args.exclusions) if args.exclusions is not None else set()
    detections = read_detections_csv(args.detections)
    result = evaluate_frame_map(gt, detections, labelmap, exclusions, protocol=args.protocol)
    if args.json:
        out = {"annotations": str(args.annotations), "detections": str(args.detections),
               "labelmap": str(args.labelmap), "exclusions": None if args.exclusions is None else str(args.exclusions),
               "annotations_read": gt.stats.to_json()}
        out.update(result.to_json())
        json.dump(out, sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(gt.stats.summary())
        dropped = ", ".join(f"{n} {what}" for what, n in result.counts.items() if what != "detections" and n)
        print(f"{args.detections}: {result.counts['detections']} detection rows" + (f"; {dropped}" if dropped else ""))
        print(result.table())
        if math.isnan(result.mAP):
            print("no class has both ground truth and a score: the mAP is undefined")
    return 0
