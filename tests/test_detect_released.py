"""A released head evaluated from the CLI on cached keyframe maps: ``--set detect.weights=FILE`` loads the
file strictly (container and prefix removed, backbone keys set aside) instead of training, and
detect_eval scores it; a file built for other maps than the store's is refused in one line, exit 2,
before any work. Files are random state dicts in the public key layout (tests/fixtures/heads_*.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from detectors.heads import build_head
from detectors.stage import released_weights
from pipeline.errors import ConfigError
from tests.layout_fixtures import layout, public_state_dict
from tests.test_demo_ava_pipeline import MANIFEST, _cli, _stage, _statuses

DEMO_CHANNELS = 576  # the demo preset's tiny SlowFast (slow 512 + fast 64)
DEMO_CLASSES = 7


def _save_mmaction2(path: Path, state: dict) -> Path:
    """An mmaction2 checkpoint: the head's keys beside the backbone's, under ``state_dict``."""
    torch.save({"state_dict": {"backbone.slow_path.conv1.weight": torch.zeros(2), **state}, "meta": {}}, path)
    return path


def _acrn_for(channels: int, classes: int, seed: int = 0) -> dict:
    """Random values in ACRN's public key layout, shaped as our ACRN built for ``channels``-channel maps
    and ``classes`` classes (the published file is the case channels=2304, classes=80)."""
    head = build_head("acrn", in_channels=channels, num_classes=classes)
    fmt, ours = head.released[0], head.state_dict()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in layout("heads_acrn_r50.json"):
        shape = ours[fmt.model_key(key)].shape
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            out[key] = torch.randn(shape, generator=gen) * 0.05
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The small demo with its keyframe store built (nothing trained)."""
    root = tmp_path_factory.mktemp("released")
    manifest = root / "demo_ava_small.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    cache = root / "cache"
    _cli(cache, "run", "extract_keyframes", "--dataset", str(manifest))
    return root, manifest, cache


def test_a_published_width_head_is_refused_on_the_demo_store_before_any_work(store):
    root, manifest, cache = store
    published = _save_mmaction2(root / "acrn_published.pth", public_state_dict("heads_acrn_r50.json", counters=True))
    err = _cli(cache, "run", "eval", "--stage", "detect", "--dataset", str(manifest), "--set", "detect.head=acrn",
               "--set", f"detect.weights={published}", code=2)["stderr"].strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (f"pipeline: error: detect.weights: {published} holds acrn weights for 2304-channel maps, but the keyframe "
                      f"store has {DEMO_CHANNELS} channels"), err
    assert not (cache / "detect").exists()  # nothing trained, loaded or written


def test_a_released_head_of_the_stores_width_loads_strictly_and_is_scored(store):
    root, manifest, cache = store
    state = _acrn_for(DEMO_CHANNELS, DEMO_CLASSES)
    path = _save_mmaction2(root / "acrn_576.pth", state)
    report = _cli(cache, "run", "eval", "--stage", "detect", "--dataset", str(manifest), "--set", "detect.head=acrn",
                  "--set", f"detect.weights={path}")
    assert _statuses(report) == {"extract_keyframes": "cached", "detect": "ran", "detect_eval": "ran"}
    detect = _stage(report, "detect")
    assert "not trained" in detect["summary"]
    out = Path(detect["dir"])
    assert not (out / "train_log.csv").exists()
    model = torch.load(out / "model.pt", map_location="cpu", weights_only=True)["head"]
    for key, value in state.items():  # every key consumed, prefix stripped, values as in the file
        torch.testing.assert_close(model[key.removeprefix("roi_head.shared_head.").removeprefix("roi_head.bbox_head.")],
                                   value, rtol=0, atol=0)
    metrics = json.loads((Path(_stage(report, "detect_eval")["dir"]) / "metrics.json").read_text())
    assert metrics["head"] == "acrn" and 0 <= metrics["mAP"] <= 1 and metrics["keyframes"] > 0

    # the same file with one tensor of another shape: refused by name, nothing evaluated
    bad = dict(state)
    bad["roi_head.bbox_head.fc_cls.weight"] = bad["roi_head.bbox_head.fc_cls.weight"][:3]
    bad_path = _save_mmaction2(root / "acrn_bad.pth", bad)
    err = _cli(cache, "run", "eval", "--stage", "detect", "--dataset", str(manifest), "--set", "detect.head=acrn",
               "--set", f"detect.weights={bad_path}", code=2)["stderr"].strip().splitlines()
    assert len(err) == 1 and "shape mismatch" in err[0] and "fc_cls.weight" in err[0], err


def test_released_weights_name_the_param(tmp_path):
    with pytest.raises(ConfigError, match=r"^detect.weights: head roi_linear has no released weights"):
        released_weights("roi_linear", str(tmp_path / "x.pth"), 576)
    with pytest.raises(ConfigError, match="checkpoint file not found"):
        released_weights("acar", str(tmp_path / "missing.pth"), 2304)
    acar = tmp_path / "acar.pth"
    torch.save(public_state_dict("heads_acar_r50.json"), acar)
    assert set(released_weights("acar", str(acar), 2304)) == set(layout("heads_acar_r50.json"))
    with pytest.raises(ConfigError, match="for 2304-channel maps, but the keyframe store has 768 channels"):
        released_weights("acar", str(acar), 768)
