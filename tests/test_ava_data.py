"""AVA readers (pipeline/ava.py), box helpers and detect manifests, on hand-made and the real files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from ava_fixtures import LABELMAP_2019, LABELMAP_ID, LABELMAP_LABEL_ID, ROOT, csv_rows, needs_real_ava, real, write
from pipeline.ava import (keyframe_id, load_split, parse_keyframe_id, read_boxes, read_exclusions, read_labelmap,
                          read_proposals)
from pipeline.boxes import box_iou, clip_boxes, valid_boxes
from pipeline.cli import main
from pipeline.datasets import load_dataset
from pipeline.errors import ConfigError


def test_keyframe_ids_are_the_official_keys():
    assert keyframe_id("1j20qq1JyX4", 902) == "1j20qq1JyX4,0902"
    assert keyframe_id("a,b", 1798) == "a,b,1798"
    assert parse_keyframe_id("a,b,0902") == ("a,b", 902)
    with pytest.raises(ConfigError, match="expected 'video_id,timestamp'"):
        parse_keyframe_id("novideo")


def test_box_helpers():
    a = np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    b = np.array([[0, 0, 0.5, 0.25], [0.25, 0.25, 0.75, 0.75], [0, 0, 0, 0]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou[0], [0.5, 0.0625 / (0.25 + 0.25 - 0.0625), 0])
    np.testing.assert_allclose(iou[1, 1], 0.0625 / (0.5 - 0.0625))
    clipped, changed = clip_boxes(np.array([[-0.1, 0.2, 1.2, 0.9], [0.1, 0.1, 0.2, 0.2]]))
    np.testing.assert_allclose(clipped[0], [0, 0.2, 1, 0.9])
    assert changed.tolist() == [True, False]
    assert valid_boxes(np.array([[0, 0, 1, 1], [0.5, 0, 0.5, 1], [0, 0.6, 1, 0.5], [0, 0, np.nan, 1]])).tolist() == \
        [True, False, False, False]


@pytest.mark.parametrize("text", [LABELMAP_ID, LABELMAP_LABEL_ID, LABELMAP_2019,
                                  "12: stand\n79: talk to (e.g., self, a person, a group)\n\n80: watch (a person)\n"])
def test_labelmap_syntaxes(tmp_path, text):
    assert read_labelmap(write(tmp_path, "map.pbtxt", text)) == {
        12: "stand", 79: "talk to (e.g., self, a person, a group)", 80: "watch (a person)"}


@pytest.mark.parametrize("text,fragment", [
    ('item {\n  name: "a"\n}\n', "map.pbtxt:1: item without id"),
    ('item {\n  id: 3\n}\n', "map.pbtxt:1: item without name"),
    ('item {\n  name: "a"\n  id: 3\n}\nitem {\n  name: "b"\n  id: 3\n}\n', "map.pbtxt:5: id 3 given twice"),
    ("1: a\nbend\n", "map.pbtxt:2: expected 'id: name'"),
    ("", "map.pbtxt: no labels"),
])
def test_labelmap_errors(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        read_labelmap(write(tmp_path, "map.pbtxt", text))
    assert fragment in str(e.value)


def test_boxes_merged_per_box_and_timestamps_in_both_forms(tmp_path):
    p = write(tmp_path, "gt.csv", csv_rows([
        ("v", "0902", 0.1, 0.1, 0.5, 0.9, 12, 0),
        ("v", "0902", 0.5, 0.1, 0.9, 0.9, 80, 1),
        ("v", "0902", 0.1, 0.1, 0.5, 0.9, 80, 2),    # same coordinates, another person: another box
        ("w", "1000", 0.2, 0.2, 0.4, 0.4, 2, 5),     # an AVA action outside the label map: box kept, no label
        ("v", "902", 0.1, 0.100, 0.5, 0.9, 79, 0),   # the first box again, further down, plain timestamp
    ]) + "\n")
    table = read_boxes(p, {12, 79, 80})
    assert list(table) == [("v", 902), ("w", 1000)]
    kf = table[("v", 902)]
    assert kf.labels == ((12, 79), (80,), (80,)) and kf.person_ids == (0, 1, 2)
    assert kf.boxes.dtype == np.float32 and kf.boxes.shape == (3, 4)
    np.testing.assert_allclose(kf.boxes[1], [0.5, 0.1, 0.9, 0.9])
    assert table[("w", 1000)].labels == ((),)
    s = table.stats
    assert (s.rows, s.keyframes, s.boxes, s.unlisted_rows, s.clipped, s.degenerate) == (5, 2, 4, 1, 0, 0)
    assert "1 rows of actions outside the label map dropped" in s.summary()
    seven = read_boxes(write(tmp_path, "gt7.csv", "v,902,0.1,0.1,0.5,0.9,12\n"), None)
    assert seven[("v", 902)].person_ids == (-1,)


def test_spaces_quotes_and_blank_lines_read_as_the_plain_file(tmp_path):
    plain = "v,0902,0.1,0.1,0.5,0.9,12,0\nv,0902,0.1,0.1,0.5,0.9,79,0\n-x9,1000,0.2,0.2,0.4,0.4,80,5\n"
    messy = ' v, 0902 ,0.1,0.1,0.5,0.9,12,0\n\n  \n"v",902,0.1,0.1,0.5,0.9,79,0\n-x9,1000,0.2,0.2,0.4,0.4,80,5 \n'
    a, b = (read_boxes(write(tmp_path, name, text), {12, 79, 80}) for name, text in (("a.csv", plain),
                                                                                     ("b.csv", messy)))
    assert list(a) == list(b) == [("v", 902), ("-x9", 1000)]
    assert all(a[k].labels == b[k].labels and np.array_equal(a[k].boxes, b[k].boxes) for k in a)
    with pytest.raises(ConfigError, match="b.csv:5: x1: expected a number, got 'x'"):
        read_boxes(write(tmp_path, "b.csv", messy.replace("-x9,1000,0.2", "-x9,1000,x")), {12, 79, 80})


def test_out_of_range_boxes_are_clipped_and_degenerate_ones_dropped_and_counted(tmp_path):
    p = write(tmp_path, "gt.csv", csv_rows([
        ("v", 902, -0.05, 0.1, 0.5, 1.02, 12, 0),
        ("v", 902, -0.05, 0.1, 0.5, 1.02, 79, 0),   # the same box: counted once
        ("v", 902, 0.6, 0.1, 0.6, 0.9, 12, 1),      # zero width
        ("v", 903, 0.6, 0.9, 0.7, 0.1, 12, 1),      # y2 < y1: the keyframe has no box left
        ("v", 904, 1.2, 0.1, 1.5, 0.9, 12, 1),      # wholly outside: zero width after clipping
    ]))
    table = read_boxes(p, {12, 79})
    assert list(table) == [("v", 902)]
    np.testing.assert_allclose(table[("v", 902)].boxes, [[0, 0.1, 0.5, 1]])
    assert (table.stats.clipped, table.stats.degenerate, table.stats.boxes) == (1, 3, 1)
    assert "1 boxes clipped to [0, 1], 3 degenerate boxes dropped" in table.stats.summary()


GT_ROW = "v,0902,0.1,0.1,0.5,0.9,12,0"


@pytest.mark.parametrize("reader,row,fragment", [
    ("boxes", "v,0902,0.1,0.1,0.5,0.9", "gt.csv:2: expected 8 columns"),
    ("boxes", "v,0902,0.1,0.1,0.5,0.9,12,0,1", "gt.csv:2: expected 8 columns"),
    ("boxes", "v,09o2,0.1,0.1,0.5,0.9,12,0", "gt.csv:2: timestamp: expected an integer, got '09o2'"),
    ("boxes", "v,902.5,0.1,0.1,0.5,0.9,12,0", "gt.csv:2: timestamp: expected an integer, got '902.5'"),
    ("boxes", "v,0902,abc,0.1,0.5,0.9,12,0", "gt.csv:2: x1: expected a number, got 'abc'"),
    ("boxes", "v,0902,0.1,0.1,0.5,,12,0", "gt.csv:2: y2: expected a number, got ''"),
    ("boxes", "v,0902,0.1,0.1,0.5,nan,12,0", "gt.csv:2: y2: expected a number, got 'nan'"),
    ("boxes", "v,0902,0.1,0.1,0.5,0.9,twelve,0", "gt.csv:2: action_id: expected an integer, got 'twelve'"),
    ("boxes", "v,0902,0.1,0.1,0.5,0.9,12,p0", "gt.csv:2: person_id: expected an integer, got 'p0'"),
    ("boxes", "v,0902,0.1,0.1,0.5,0.9,81,0", "gt.csv:2: action_id: unknown label id 81"),
    ("boxes", "v,0902,0.1,0.1,0.5,0.9,0,0", "gt.csv:2: action_id: unknown label id 0"),
    ("proposals", "v,0902,0.1,0.1,0.5,0.9", "gt.csv:2: expected 8 columns"),
    ("proposals", "v,0902,0.1,0.1,0.5,0.9,,high", "gt.csv:2: score: expected a number, got 'high'"),
    ("proposals", "v,0902,0.1,0.1,0.5,0.9,,", "gt.csv:2: score: expected a number, got ''"),
    ("exclusions", "v", "gt.csv:2: expected 2 columns"),
    ("exclusions", "v,late", "gt.csv:2: timestamp: expected an integer, got 'late'"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, reader, row, fragment):
    first = {"boxes": GT_ROW, "proposals": "v,0902,0.1,0.1,0.5,0.9,,0.99", "exclusions": "v,0902"}[reader]
    p = write(tmp_path, "gt.csv", f"{first}\n{row}\n")
    read = {"boxes": lambda: read_boxes(p, {12}), "proposals": lambda: read_proposals(p, 0.5),
            "exclusions": lambda: read_exclusions(p)}[reader]
    with pytest.raises(ConfigError) as e:
        read()
    assert fragment in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="nope.csv: annotations file not found"):
        read_boxes(tmp_path / "nope.csv")


PROPOSAL_ROWS = [
    ("v", "0902", 0.1, 0.1, 0.5, 0.9, "", 0.99),
    ("v", "0902", 0.1, 0.1, 0.5, 0.9, "", 0.95),      # the same box again (a row per action): kept once, best score
    ("v", "0902", 0.5, -0.1, 1.1, 0.9, "", 0.92),     # clipped
    ("v", "0902", 0.6, 0.1, 0.6, 0.9, "", 0.97),      # degenerate
    ("v", "0902", 0.2, 0.2, 0.3, 0.3, "", 0.40),      # below the threshold
    ("v", "903", 0.2, 0.2, 0.3, 0.3, "", 0.10),       # a keyframe with no box above it stays, empty
]


def _check_proposals(table):
    assert list(table) == [("v", 902), ("v", 903)]
    np.testing.assert_allclose(table[("v", 902)], [[0.1, 0.1, 0.5, 0.9, 0.99], [0.5, 0, 1, 0.9, 0.92]], rtol=1e-6)
    assert table[("v", 902)].dtype == np.float32 and table[("v", 903)].shape == (0, 5)
    s = table.stats
    assert (s.clipped, s.degenerate, s.below_score, s.boxes, s.keyframes) == (1, 1, 2, 2, 2)


@pytest.mark.parametrize("layout", ["8 columns, 7th empty", "7 columns"])
def test_proposal_csv(tmp_path, layout):
    rows = PROPOSAL_ROWS if layout.startswith("8") else [r[:6] + r[7:] for r in PROPOSAL_ROWS]
    _check_proposals(read_proposals(write(tmp_path, "boxes.csv", csv_rows(rows)), min_score=0.5))


def test_proposal_pickle_as_mmaction2_writes_it(tmp_path):
    data = {}
    for r in PROPOSAL_ROWS:
        data.setdefault(f"{r[0]},{int(r[1]):04d}", []).append([r[2], r[3], r[4], r[5], r[7]])
    p = tmp_path / "dense_proposals.pkl"
    p.write_bytes(pickle.dumps({k: np.array(v, dtype=np.float32) for k, v in data.items()}, protocol=4))
    _check_proposals(read_proposals(p, min_score=0.5))
    old = tmp_path / "numpy1.pkl"  # written under numpy 1, whose arrays pickle as numpy.core.multiarray
    old.write_bytes(pickle.dumps({k: np.array(v) for k, v in data.items()}, protocol=2)
                    .replace(b"numpy._core.", b"numpy.core."))
    assert b"numpy.core.multiarray" in old.read_bytes()
    _check_proposals(read_proposals(old, min_score=0.5))
    p5 = tmp_path / "proposals.bin"  # told apart from a CSV by its first byte too; protocol 5 buffers
    p5.write_bytes(pickle.dumps({k: np.array(v) for k, v in data.items()}, protocol=5))
    _check_proposals(read_proposals(p5, min_score=0.5))


class _Exploit:
    def __reduce__(self):
        return os.system, ("touch pwned",)


@pytest.mark.parametrize("payload,fragment", [
    ({"v,0902": _Exploit()}, "refusing to load posix.system"),
    ({"v,0902": np.zeros((2, 4))}, "v,0902: expected an N x 5 array"),
    ({"v": np.zeros((1, 5))}, "keyframe id 'v'"),
    ([np.zeros((1, 5))], "expected a dict"),
])
def test_proposal_pickle_refuses_code_and_bad_values(tmp_path, monkeypatch, payload, fragment):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "bad.pkl"
    p.write_bytes(pickle.dumps(payload))
    with pytest.raises(ConfigError) as e:
        read_proposals(p)
    assert fragment in str(e.value) and str(p) in str(e.value)
    assert not (tmp_path / "pwned").exists()
    p.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ConfigError, match="not a proposals pickle"):
        read_proposals(p)


def _detect_manifest(tmp_path, extra: str = "") -> Path:
    write(tmp_path, "map.pbtxt", LABELMAP_LABEL_ID)
    write(tmp_path, "train.csv", csv_rows([("v", 902, 0.1, 0.1, 0.5, 0.9, 12, 0), ("v", 903, 0.1, 0.1, 0.5, 0.9, 80, 0),
                                           ("w", 950, 0.1, 0.1, 0.5, 0.9, 79, 0)]))
    write(tmp_path, "excl.csv", "v,0903\nv,0905\n")
    write(tmp_path, "boxes.csv", csv_rows([("v", 904, 0.1, 0.1, 0.5, 0.9, "", 0.9),
                                           ("v", 905, 0.1, 0.1, 0.5, 0.9, "", 0.9),
                                           ("w", 950, 0.2, 0.1, 0.5, 0.9, "", 0.3)]))
    (tmp_path / "videos").mkdir(exist_ok=True)
    return write(tmp_path, "ava.yaml", f"""name: toyava
task: detect
videos: ${{TOY_AVA_VIDEOS}}
timestamp_offset_s: 900
labelmap: map.pbtxt
annotations: {{train: train.csv}}
exclusions: {{train: excl.csv}}
proposals: {{train: boxes.csv}}
splits: {{train: train, test: train}}
{extra}""")


def test_detect_manifest_and_load_split(tmp_path, monkeypatch):
    monkeypatch.setenv("TOY_AVA_VIDEOS", str(tmp_path / "videos"))
    ds = load_dataset(_detect_manifest(tmp_path), ROOT, tmp_path / "cache")
    assert ds.task == "detect" and ds.videos == tmp_path / "videos" and ds.ava.timestamp_offset_s == 900
    assert ds.ava.files() == {"labelmap": tmp_path / "map.pbtxt", "annotations.train": tmp_path / "train.csv",
                              "exclusions.train": tmp_path / "excl.csv", "proposals.train": tmp_path / "boxes.csv"}
    ds.check_paths(need_videos=True)
    split = load_split(ds, "test", min_score=0.5)
    assert split.name == "train" and split.labelmap == {12: "stand", 79: "talk to (e.g., self, a person, a group)",
                                                        80: "watch (a person)"}
    assert split.exclusions == {("v", 903), ("v", 905)}
    assert split.keyframes == {"v": (902, 904), "w": (950,)}  # GT + proposal keyframes, excluded ones gone
    assert set(split.gt) == {("v", 902), ("w", 950)} and set(split.proposals) == {("v", 904), ("w", 950)}
    assert split.proposals[("w", 950)].shape == (0, 5)
    assert split.time_in_video(902) == 2.0
    assert [line.split(": ", 1)[1] for line in split.log_lines()] == [
        "3 rows, 2 keyframes, 2 boxes; 1 excluded keyframes dropped",
        "3 rows, 2 keyframes, 1 boxes; 1 boxes below the score threshold dropped, 1 excluded keyframes dropped"]
    with pytest.raises(ConfigError, match="split 'val': not in annotations or proposals"):
        load_split(ds, "val")


@pytest.mark.parametrize("extra,drop,fragment", [
    ("features: {x: 1}\n", None, "ava.yaml: features: unknown field of a detect dataset"),
    ("", "labelmap: map.pbtxt\n", "ava.yaml: labelmap: required for a detect dataset"),
    ("", "annotations: {train: train.csv}\n", None),   # proposals alone (AVA's test split) are enough
    ("", "timestamp_offset_s: 900\n", None),
    ("", "timestamp_offset_s: 900", "ava.yaml: timestamp_offset_s: expected seconds >= 0, got 'x'"),
    ("", "exclusions: {train: excl.csv}", "ava.yaml: exclusions.val: no annotations or proposals for split 'val'"),
    ("", "splits: {train: train, test: train}", "ava.yaml: splits.test: 'val' is not a split of"),
    ("", "annotations: {train: train.csv}", "ava.yaml: annotations: expected a mapping split -> file"),
])
def test_detect_manifest_errors(tmp_path, monkeypatch, extra, drop, fragment):
    monkeypatch.setenv("TOY_AVA_VIDEOS", str(tmp_path / "videos"))
    path = _detect_manifest(tmp_path, extra)
    if drop is not None:
        replacement = {"timestamp_offset_s: 900": "timestamp_offset_s: x", "exclusions: {train: excl.csv}":
                       "exclusions: {val: excl.csv}", "splits: {train: train, test: train}":
                       "splits: {train: train, test: val}", "annotations: {train: train.csv}":
                       "annotations: train.csv"}.get(drop, "")
        path.write_text(path.read_text().replace(drop, replacement))
    if fragment is None:
        load_dataset(path, ROOT, tmp_path / "cache")
        return
    with pytest.raises(ConfigError) as e:
        load_dataset(path, ROOT, tmp_path / "cache")
    assert fragment in str(e.value)


def test_detect_keys_are_errors_in_a_localize_manifest(tmp_path):
    p = write(tmp_path, "thumosish.yaml", "name: t\nvideos: v\nlabelmap: x.pbtxt\n")
    with pytest.raises(ConfigError, match="thumosish.yaml: labelmap: unknown field of a localize dataset"):
        load_dataset(p, ROOT, tmp_path / "cache")


def test_layout_files_enter_the_annotation_fingerprint_and_run_names_a_missing_one(tmp_path, monkeypatch, capsys):
    from pipeline.runner import Planner, Workspace

    monkeypatch.setenv("TOY_AVA_VIDEOS", str(tmp_path / "videos"))
    manifest = _detect_manifest(tmp_path)
    ws = Workspace.open(ROOT / "stages.yaml", tmp_path / "cache")

    def fingerprint():
        return Planner(ws, load_dataset(manifest, ROOT, tmp_path / "cache")).annotations_fingerprint()

    before = fingerprint()
    (tmp_path / "excl.csv").write_text("v,0903\n")
    assert before is not None and fingerprint() not in (before, None)
    (tmp_path / "excl.csv").unlink()
    assert main(["--cache-dir", str(tmp_path / "cache"), "run", "extract_keyframes", "--dataset", str(manifest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ava.yaml: exclusions.train: not found: " in err[0], err


def test_shipped_ava_manifest_names_the_v22_layout(monkeypatch, tmp_path):
    monkeypatch.setenv("AVA_VIDEOS", str(tmp_path))
    ds = load_dataset("ava", ROOT, tmp_path / "cache")
    files = {k: p.relative_to(ROOT / "data") for k, p in ds.ava.files().items()}
    assert files == {"labelmap": Path("annotations/ava/ava_action_list_v2.2_for_activitynet_2019.pbtxt"),
                     "annotations.train": Path("annotations/ava/ava_train_v2.2.csv"),
                     "annotations.val": Path("annotations/ava/ava_val_v2.2.csv"),
                     "exclusions.train": Path("annotations/ava/ava_train_excluded_timestamps_v2.2.csv"),
                     "exclusions.val": Path("annotations/ava/ava_val_excluded_timestamps_v2.2.csv")}
    assert ds.videos == tmp_path and ds.splits == {"train": "train", "test": "val"}


@needs_real_ava
def test_real_label_maps_agree():
    pbtxt = read_labelmap(real("ava_action_list_v2.1_for_activitynet_2018.pbtxt"))
    assert len(pbtxt) == 60 and 2 not in pbtxt and min(pbtxt) == 1 and max(pbtxt) == 80
    assert pbtxt[80] == "watch (a person)"
    assert read_labelmap(real("mmaction2_ava_label_map.txt")) == pbtxt


@needs_real_ava
def test_real_validation_head_and_exclusions():
    labelmap = read_labelmap(real("ava_action_list_v2.1_for_activitynet_2018.pbtxt"))
    gt = read_boxes(real("ava_val_v2.1_head27163.csv"), set(labelmap))
    assert gt.stats.rows == 27163 and len(gt) == 6470
    assert len({v for v, _ in gt}) == 8 and min(t for _, t in gt) == 902 and max(t for _, t in gt) <= 1798
    first = gt[("1j20qq1JyX4", 902)]
    np.testing.assert_allclose(first.boxes, [[0.002, 0.118, 0.714, 0.977], [0.444, 0.054, 0.992, 0.990]], rtol=1e-6)
    assert first.labels == ((12, 79), (12, 17, 79)) and first.person_ids == (1, 0)
    listed_rows = sum(len(lbl) for kf in gt.values() for lbl in kf.labels)
    assert listed_rows + gt.stats.unlisted_rows == 27163 and gt.stats.degenerate == gt.stats.clipped == 0
    assert all(set(lbl) <= set(labelmap) for kf in gt.values() for lbl in kf.labels)
    val_excl = read_exclusions(real("ava_val_excluded_timestamps_v2.1.csv"))
    assert len(val_excl) == 37 and ("5BDj0ow5hnA", 1038) in val_excl
    assert len(read_exclusions(real("ava_train_excluded_timestamps_v2.1.csv"))) == 161
