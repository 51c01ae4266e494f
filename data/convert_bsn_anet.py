"""Build data/annotations/anet13.json (ActivityNet-style) from BSN's copy of the ActivityNet 1.3 annotations.

The official activity_net.v1-3.min.json could not be obtained; BSN's anet_anno_action.json keeps its
segments (official float values), labels and durations for the 19228 videos BSN could download, and
BSN's video_info_new.csv their subsets and frame rates. Video ids keep BSN's `v_` prefix, which is how
the videos and public features (BSN, TSP) name their files, so ids match the file stems.
label_id is the position of the label in the sorted list of the 200 class names.

    python data/convert_bsn_anet.py /work/shared/data/annotations/activitynet13 data/annotations/anet13.json
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def convert(source: Path) -> dict:
    anno = json.loads((source / "bsn_anet_anno_action.json").read_text(encoding="utf-8"))
    with open(source / "bsn_video_info_new.csv", newline="", encoding="utf-8") as f:
        info = {row["video"]: row for row in csv.DictReader(f)}
    missing = sorted(set(anno) ^ set(info))
    if missing:
        raise SystemExit(f"{source}: videos in only one of the annotation json and the info csv: {missing[:5]}")
    classes = sorted({a["label"] for video in anno.values() for a in video["annotations"]})
    label_id = {name: i for i, name in enumerate(classes)}
    database = {}
    for vid in sorted(anno):
        video = anno[vid]
        database[vid] = {
            "subset": info[vid]["subset"],
            "duration": video["duration_second"],
            "fps": float(info[vid]["fps"]),
            "annotations": [
                {"segment": a["segment"], "label": a["label"], "label_id": label_id[a["label"]]}
                for a in video["annotations"]
            ],
        }
    return {"version": "ActivityNet 1.3 (from BSN anet_anno_action.json)", "database": database}


def write(data: dict, out: Path) -> None:
    # one video per line: small, and diffs stay readable
    lines = [f"{json.dumps(vid)}:{json.dumps(v, separators=(',', ':'))}" for vid, v in data["database"].items()]
    out.write_text('{"version":' + json.dumps(data["version"]) + ',"database":{\n' + ",\n".join(lines) + "\n}}\n",
                   encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    write(convert(Path(sys.argv[1])), Path(sys.argv[2]))
