"""Validation before training and ``localize.regression_ranges: auto``: the ranges drawn from the
training split's segment lengths by the documented rule, logged and recorded in config.json, accepted by
the schema through the CLI; a localize.input_dim that differs from the store's feature_dim refused in one
line through the CLI before training (the feature_dim is known once the features exist: when extract
must run first, it runs, and localize refuses before writing anything). (The max_seq_len, window and range checks through the CLI are
in tests/test_params_schema.py's BAD_SETS.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from localize_synthetic import make_videos
from localizers.data import VideoItem, auto_regression_ranges
from pipeline.cli import main
from pipeline.errors import ConfigError
from test_localize_workflow import _dataset


def _items(half_lengths) -> list[VideoItem]:
    """One video per segment, of the given half-lengths on the input grid."""
    return [VideoItem(f"v{i}", 10_000, None, 100.0, np.array([[10.0, 10.0 + 2 * h]], np.float32),
                      np.zeros(1, np.int64)) for i, h in enumerate(half_lengths)]


@pytest.mark.parametrize("halves,levels,max_seq_len,expected", [
    # quantiles 16.75, 32.5, 48.25 -> nearest powers of two 16, 32, 64: an equal share per level
    (range(1, 65), 4, 2304, ((0, 16), (16, 32), (32, 64), (64, 10000))),
    # all alike (quantiles 5, 5, 5 -> 4): each boundary raised to twice the previous one
    ([5] * 20, 4, 2304, ((0, 4), (4, 8), (8, 16), (16, 10000))),
    # tiny segments: the first boundary at least 2, so level k's is at least its stride 2**k
    ([0.5] * 20, 4, 2304, ((0, 2), (2, 4), (4, 8), (8, 10000))),
    # segments longer than the longest crop count as max_seq_len long
    ([1e6] * 20, 3, 256, ((0, 128), (128, 256), (256, 10000))),
    ([3, 7], 1, 64, ((0, 10000),)),
])
def test_auto_ranges_follow_the_rule(halves, levels, max_seq_len, expected):
    ranges, quantiles = auto_regression_ranges(_items(halves), levels, max_seq_len)
    assert ranges == expected and len(quantiles) == levels - 1
    assert all(ranges[k][0] >= 2 ** k for k in range(1, levels))


def test_auto_ranges_split_the_segments_into_fair_shares():
    rng = np.random.default_rng(0)
    halves = np.exp(rng.uniform(np.log(2), np.log(100), 600))  # log-uniform: ~equal shares per octave pair
    ranges, _ = auto_regression_ranges(_items(halves), 4, 2304)
    counts = [int(((halves >= lo) & (halves < hi)).sum()) for lo, hi in ranges]
    assert min(counts) > 0.15 * len(halves), (ranges, counts)  # a fair share is 25%: no level starved


def test_auto_ranges_need_segments():
    empty = [VideoItem("v", 100, None, 10.0, np.zeros((0, 2), np.float32), np.zeros(0, np.int64))]
    with pytest.raises(ConfigError, match="localize.regression_ranges: auto needs annotated segments"):
        auto_regression_ranges(empty, 4, 256)


def _train(tmp_path, capsys, setting: str):
    """``run train --stage localize`` with one ``--set`` on a small generated dataset: (exit code, stderr,
    cache directory)."""
    videos = make_videos(8, seed=3, length=(60, 90))
    train, test = dict(list(videos.items())[:6]), dict(list(videos.items())[6:])
    manifest = _dataset(tmp_path, train, test, "{preset: demo, embed_dim: 16, epochs: 1, warmup_epochs: 0, threads: 1}")
    cache = tmp_path / "cache"
    capsys.readouterr()
    code = main(["--cache-dir", str(cache), "run", "train", "--stage", "localize", "--dataset", str(manifest),
                 "--set", setting])
    return code, capsys.readouterr().err, cache


def test_auto_ranges_through_the_cli_are_logged_and_recorded(tmp_path, capsys):
    code, err, cache = _train(tmp_path, capsys, "localize.regression_ranges=auto")
    assert code == 0
    (out,) = (cache / "localize").iterdir()
    saved = json.loads((out / "config.json").read_text())
    auto = saved["regression_ranges_auto"]
    assert saved["config"]["model"]["regression_ranges"] == auto["ranges"]  # what the model trained with
    assert saved["params"]["localize"]["regression_ranges"] == "auto"       # what was asked
    assert auto["ranges"][0][0] == 0 and auto["ranges"][-1][1] == 10000 and len(auto["ranges"]) == 4
    assert f"regression_ranges auto from {auto['segments']} training segments" in err
    assert str(auto["ranges"]) in err


def test_input_dim_other_than_the_stores_is_refused_in_one_line(tmp_path, capsys):
    code, err, cache = _train(tmp_path, capsys, "localize.input_dim=99")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1] == "pipeline: error: localize.input_dim: set to 99 but the feature store's feature_dim is 16", lines
    # refused before anything of localize is written (the runner's empty .partial directory aside)
    assert [list(p.iterdir()) for p in (cache / "localize").iterdir()] == [[]]
