"""The AVA-style demo generator: fixed bytes (digests pinned), lossless videos, AVA layout read back by
pipeline.ava with everything the issue asks of it (offset timestamps, non-contiguous ids, exclusions,
proposals with frames without ground truth), and labels that follow the drawn geometry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from pipeline import demo_ava
from pipeline.ava import load_split
from pipeline.datasets import AvaLayout
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"seed": 5, "train_videos": 2, "val_videos": 2, "duration_s": [8, 10], "width": 64, "height": 64,
         "actors": [2, 3], "objects": [1, 2], "empty_lead_fraction": 0.5, "empty_lead_s": [3, 4]}
# sha256 over every generated file (dataset_digest). A change here means every user's demo data changes:
# bump GENERATOR_VERSION with it and update the README's figures.
SMALL_DIGEST = "dc855eafc52d24645e96e2746738cf0f67757832bed27c8e72d81df3d772ef6c"
MANIFEST_DIGEST = "b4350c2dc274680f52fc905f65ecb7174685c0a2ba14c71de0a8db281c187bd6"


def _generate_in_a_fresh_process(spec: dict, out: Path) -> tuple[Path, str]:
    code = ("import json, sys; from pipeline.demo_ava import ensure_generated, dataset_digest; "
            "r = ensure_generated(json.loads(sys.argv[1]), sys.argv[2]); "
            "print(json.dumps([str(r), dataset_digest(r)]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(out)], capture_output=True, text=True,
                          timeout=120, check=True, cwd=ROOT)
    root, digest = json.loads(proc.stdout)
    return Path(root), digest


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _generate_in_a_fresh_process(SMALL, tmp_path_factory.mktemp("demo_ava") / "small")


def _layout(root: Path) -> AvaLayout:
    paths = demo_ava.LAYOUT
    return AvaLayout(labelmap=root / paths["labelmap"],
                     annotations={s: root / p for s, p in paths["annotations"].items()},
                     exclusions={s: root / p for s, p in paths["exclusions"].items()},
                     proposals={s: root / p for s, p in paths["proposals"].items()},
                     timestamp_offset_s=900.0, splits={"train": "train", "test": "val"}, manifest=root)


def test_the_generated_bytes_are_pinned(small):
    root, digest = small
    assert digest == SMALL_DIGEST
    assert json.loads((root / demo_ava.RECORD).read_text())["digest"] == digest


def test_the_manifests_dataset_is_pinned_and_quick(tmp_path):
    manifest = yaml.safe_load((ROOT / "data" / "demo_ava.yaml").read_text())
    root, digest = _generate_in_a_fresh_process(manifest["generate"], tmp_path / "full")
    assert digest == MANIFEST_DIGEST
    # the manifest names the files where the generator writes them
    layout = demo_ava.LAYOUT
    assert manifest["labelmap"] == layout["labelmap"]
    for key in ("annotations", "exclusions", "proposals"):
        assert manifest[key] == layout[key]
    assert manifest["timestamp_offset_s"] == manifest["generate"]["timestamp_offset_s"]


def test_videos_decode_to_exactly_the_drawn_frames(small):
    root, _ = small
    spec = demo_ava.DemoAvaSpec.from_dict(SMALL)
    world = demo_ava._simulate(spec, np.random.default_rng([spec.seed, 1, 0]))
    # one scaling thread: swscale's pool left in this process would hang decode workers forked later
    with av.open(str(root / "videos" / "train_000.mkv")) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24", threads=1) for f in container.decode(video=0)])
    np.testing.assert_array_equal(decoded, demo_ava._render(spec, world))


def test_the_ava_layout_reads_back_with_its_quirks(small):
    root, _ = small
    layout = _layout(root)
    for split_name in ("train", "val"):
        split = load_split(layout, split_name)
        assert split.labelmap == {i: name for i, (name, _) in demo_ava.ACTIONS.items()}
        stamps = [ts for (_, ts) in split.gt]
        assert min(stamps) >= 902 and split.time_in_video(min(stamps)) >= 2
        assert not set(split.gt) & split.exclusions
        without_gt = set(split.proposals) - set(split.gt)
        assert all(k not in split.exclusions for k in split.proposals)
        assert without_gt, "proposals on keyframes without ground truth (videos with an empty lead)"
    train = load_split(layout, "train")
    labels = {i for kb in train.gt.values() for box in kb.labels for i in box}
    assert labels == set(demo_ava.ACTIONS)
    for kb in train.gt.values():  # pose is exclusive: every actor either stands or walks
        assert all(len({1, 4} & set(box)) == 1 for box in kb.labels)


def test_relation_labels_follow_the_geometry():
    spec = demo_ava.DemoAvaSpec.from_dict({"seed": 1})
    world = demo_ava._simulate(spec, np.random.default_rng([1, 1, 0]))
    ids = {name: i for i, (name, _) in demo_ava.ACTIONS.items()}
    obj = world.object_boxes()
    seen = set()
    for t in range(world.lead, world.n_frames, 6):
        for a, labels in enumerate(demo_ava._labels(world, t)):
            box = world.actor_boxes[a, t]
            if ids["carry"] in labels:
                o = world.carrying[a, t]
                assert obj[o, t, 0] == box[2] + 1  # held just outside the right edge of the box
                seen.add("carry")
            if ids["touch"] in labels:
                assert (demo_ava._gap(box, obj[:, t]) <= demo_ava.TOUCH_GAP).any()
                seen.add("touch")
            # a relation's partner is outside the actor's box: the box alone cannot show it
            for o in range(len(obj)):
                inside = (obj[o, t, :2] >= box[:2]).all() and (obj[o, t, 2:] <= box[2:]).all()
                assert not (inside and ids["carry"] in labels and world.carrying[a, t] == o)
    assert seen == {"carry", "touch"}


def test_bad_generate_blocks_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="generate.widht: unknown key"):
        demo_ava.ensure_generated({"widht": 64}, tmp_path)
    with pytest.raises(ConfigError, match="generate.width: must be >= 64, got 62"):
        demo_ava.ensure_generated({"width": 62}, tmp_path)
    with pytest.raises(ConfigError, match="generate.width: must be an even integer >= 64"):
        demo_ava.ensure_generated({"width": 65}, tmp_path)
    with pytest.raises(ConfigError, match=r"generate.actors: must be \[low, high\] with low <= high"):
        demo_ava.ensure_generated({"actors": [3, 2]}, tmp_path)
    with pytest.raises(ConfigError, match="timestamp_offset_s: 0 differs"):
        demo_ava.ensure_generated({}, tmp_path, timestamp_offset_s=0)
    assert not any(tmp_path.iterdir())
