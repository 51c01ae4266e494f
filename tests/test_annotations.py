import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.annotations import load_temporal
from pipeline.errors import ConfigError

THUMOS = Path(__file__).resolve().parents[1] / "data" / "annotations" / "thumos14"


def _write(tmp_path, database, name="gt.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"database": database}))
    return path


def _video(*anns, subset="Validation", duration=60.0, **extra):
    return {"subset": subset, "duration": duration, "annotations": list(anns), **extra}


def test_reads_activitynet_json_in_file_order_with_classes_by_label_id(tmp_path):
    path = _write(tmp_path, {
        "b": _video({"segment": [1, 2], "label": "Zed", "label_id": 0}, {"segment": [3, 5.5], "label": "Ant", "label_id": 1},
                    fps=25),
        "a": _video({"segment": [0, 0], "label": "Zed", "label_id": 0}, subset="Test"),
    })
    gt = load_temporal(path)
    assert gt.classes == ("Zed", "Ant") and gt.label_index() == {"Zed": 0, "Ant": 1}
    assert list(gt.videos) == ["b", "a"]
    b = gt.videos["b"]
    assert b.fps == 25.0 and b.duration == 60.0 and b.labels == ("Zed", "Ant")
    assert b.segments.dtype == np.float64 and b.segments.tolist() == [[1, 2], [3, 5.5]]
    assert list(gt.subset("TEST")) == ["a"] and gt.videos["a"].fps is None


def test_classes_sorted_by_name_without_label_ids(tmp_path):
    gt = load_temporal(_write(tmp_path, {"v": _video({"segment": [1, 2], "label": "b"}, {"segment": [1, 2], "label": "a"})}))
    assert gt.classes == ("a", "b")


@pytest.mark.parametrize("entry, message", [
    (_video({"segment": [1, 2]}), "video v: annotations\\[0\\]: field 'label' missing"),
    (_video({"label": "x"}), "video v: annotations\\[0\\]: field 'segment' must be"),
    (_video({"segment": [5, 2], "label": "x"}), "video v: annotations\\[0\\]: field 'segment': end 2.0 is before start 5.0"),
    (_video({"segment": [-3, 2], "label": "x"}), "start -3.0 is before the video starts"),
    (_video({"segment": ["a", 2], "label": "x"}), "field 'segment': expected a finite number"),
    ({"duration": 5, "annotations": []}, "video v: field 'subset' missing"),
    ({"subset": "Test", "annotations": []}, "video v: field 'duration': expected a finite number, got None"),
    (_video(duration=0), "field 'duration' must be > 0"),
    (_video(fps=-1), "field 'fps' must be > 0"),
    ({"subset": "Test", "duration": 5}, "field 'annotations' missing"),
    (_video({"segment": [1, 2], "label": "x", "label_id": "3"}), "field 'label_id': expected an integer"),
])
def test_bad_fields_are_one_line_errors_naming_file_video_field(tmp_path, entry, message):
    path = _write(tmp_path, {"v": entry})
    with pytest.raises(ConfigError, match=message) as err:
        load_temporal(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_inconsistent_label_ids_are_rejected(tmp_path):
    two_ids = _write(tmp_path, {"v": _video({"segment": [1, 2], "label": "x", "label_id": 0}),
                                "w": _video({"segment": [1, 2], "label": "x", "label_id": 1})})
    with pytest.raises(ConfigError, match="video w: annotations\\[0\\]: field 'label_id': 1 for 'x', which has label_id 0"):
        load_temporal(two_ids)
    shared_id = _write(tmp_path, {"v": _video({"segment": [1, 2], "label": "x", "label_id": 0},
                                              {"segment": [1, 2], "label": "y", "label_id": 0})})
    with pytest.raises(ConfigError, match="0 is used by both 'x' and 'y'"):
        load_temporal(shared_id)
    partial = _write(tmp_path, {"v": _video({"segment": [1, 2], "label": "x", "label_id": 0},
                                           {"segment": [1, 2], "label": "y"})})
    with pytest.raises(ConfigError, match="label_id given for some labels but not for \\['y'\\]"):
        load_temporal(partial)


def test_segments_past_the_end_keep_clip_or_error(tmp_path):
    path = _write(tmp_path, {"v": _video({"segment": [10, 20.5], "label": "x"}, {"segment": [15, 40], "label": "x"},
                                         {"segment": [30, 35], "label": "y"}, duration=20.0)})
    assert load_temporal(path).videos["v"].segments.tolist() == [[10, 20.5], [15, 40], [30, 35]]
    clipped = load_temporal(path, out_of_range="clip").videos["v"]
    assert clipped.segments.tolist() == [[10, 20], [15, 20]] and clipped.labels == ("x", "x")
    with pytest.raises(ConfigError, match="video v: annotations\\[1\\]: field 'segment' \\[15.0, 40.0\\] ends past"):
        load_temporal(path, out_of_range="error")  # 20.5 is within the tolerance, 40 is not


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="annotation file not found"):
        load_temporal(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json: not a readable JSON"):
        load_temporal(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match='list.json: expected an ActivityNet-style object with a "database"'):
        load_temporal(tmp_path / "list.json")
    # JSON keeps the last of two equal keys: the first video's labels would vanish without a word
    entry = '{"subset": "training", "duration": 10, "annotations": []}'
    (tmp_path / "twice.json").write_text(f'{{"database": {{"v1": {entry}, "v1": {entry}}}}}')
    with pytest.raises(ConfigError, match="twice.json: key 'v1' appears twice in one object"):
        load_temporal(tmp_path / "twice.json")


def test_thumos_txt_folder_excludes_ambiguous_and_tolerates_crlf(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "Diving_val.txt").write_bytes(b"video_validation_1  1.5 3.0\r\nvideo_validation_2 4 9\r\n\r\n")
    (tmp_path / "val" / "Ambiguous_val.txt").write_text("video_validation_1 5.0 6.0\nvideo_validation_3 1 2\n")
    (tmp_path / "val" / "detclasslist.txt").write_text("7 Diving\r\n")
    (tmp_path / "Shotput_test.txt").write_text("video_test_9 0.2 1.1\n")
    gt = load_temporal(tmp_path)
    assert gt.classes == ("Diving", "Shotput")
    assert sorted(gt.subset("validation")) == ["video_validation_1", "video_validation_2", "video_validation_3"]
    v1 = gt.videos["video_validation_1"]
    assert v1.segments.tolist() == [[1.5, 3.0]] and v1.labels == ("Diving",) and v1.fps is None
    assert math.isnan(v1.duration) and gt.videos["video_test_9"].subset == "Test"
    assert gt.videos["video_validation_3"].labels == ()

    (tmp_path / "val" / "Diving_val.txt").write_text("video_validation_1 1.5\n")
    with pytest.raises(ConfigError, match="Diving_val.txt:1: expected 'video_id t_start t_end'"):
        load_temporal(tmp_path)
    (tmp_path / "val" / "Diving_val.txt").write_text("video_validation_1 3 1.5\n")
    with pytest.raises(ConfigError, match="Diving_val.txt:1: video video_validation_1: segment: end 1.5 is before"):
        load_temporal(tmp_path)
    (tmp_path / "val" / "Diving_val.txt").write_text("v 1 2\n")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="notes.txt: expected a file named <Class>_val.txt"):
        load_temporal(tmp_path)


def test_official_thumos14_loads_and_agrees_with_the_official_txt():
    gt = load_temporal(THUMOS / "thumos14.json")
    assert len(gt.classes) == 20 and gt.classes[0] == "BaseballPitch" and gt.classes[-1] == "VolleyballSpiking"
    assert len(gt.subset("validation")) == 200 and len(gt.subset("test")) == 212
    assert sum(len(v.labels) for v in gt.videos.values()) == 6365
    # 30 official segments lie wholly past the end of 5 videos: kept (as the official evaluator counts
    # them), dropped by "clip"
    assert sum(len(v.labels) for v in load_temporal(THUMOS / "thumos14.json", out_of_range="clip").videos.values()) == 6335
    txt = load_temporal(THUMOS / "official_txt")
    assert txt.classes == gt.classes
    for vid, video in gt.videos.items():
        other = txt.videos[vid]
        assert sorted(zip(video.labels, video.segments.tolist())) == sorted(zip(other.labels, other.segments.tolist()))


def test_point_events_read_as_timestamps_held_as_empty_segments(tmp_path):
    gt = load_temporal(_write(tmp_path, {
        "v": _video({"timestamp": 12.5, "label": "goal"}, {"timestamp": 3, "label": "pass"}),
        "w": _video(subset="Test"),
    }))
    assert gt.points and gt.classes == ("goal", "pass")
    assert gt.videos["v"].segments.tolist() == [[12.5, 12.5], [3.0, 3.0]]
    assert gt.videos["v"].labels == ("goal", "pass") and gt.videos["w"].segments.shape == (0, 2)
    segments = load_temporal(_write(tmp_path, {"v": _video({"segment": [2, 2], "label": "a"})}, "s.json"))
    assert not segments.points  # an empty segment stays a segment: only "timestamp" makes point events


@pytest.mark.parametrize("anns, message", [
    ([{"timestamp": 1, "segment": [1, 1], "label": "a"}], "has both 'segment' and 'timestamp'"),
    ([{"segment": [1, 2], "label": "a"}, {"timestamp": 1, "label": "a"}],
     "annotations[1]: field 'timestamp' in a file whose annotations have the other kind (first at video v: "
     "annotations[0])"),
    ([{"timestamp": "1", "label": "a"}], "annotations[0]: field 'timestamp': expected a finite number"),
    ([{"timestamp": -3, "label": "a"}], "annotations[0]: field 'timestamp': start -3.0 is before the video starts"),
])
def test_bad_point_events_name_the_annotation(tmp_path, anns, message):
    with pytest.raises(ConfigError) as e:
        load_temporal(_write(tmp_path, {"v": _video(*anns)}))
    assert message in str(e.value)
