"""One schema per stage config, through the CLI: every bad value is refused when the run is planned (exit 2,
one line naming the param, nothing made), nested keys and ``--config`` files name the same params as
``--set``, and the ``config.json`` a training run writes makes the same stage key again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from localize_synthetic import CLIP, FPS, STRIDE, make_videos
from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent

BAD_SETS = {
    "localize_eval.max_duration=0.01": "must exceed duration_thresh",  # over the trained preset's test settings
    "localize.epochs=x": "expected an integer",
    "localize.epochs=1.5": "expected an integer",
    "localize.epochs=true": "expected an integer",
    "localize.epochs=1000000000": "must be <= 10000",
    "localize.train.epochs=0": "must be >= 1",
    "localize.lr=.inf": "must be finite",
    "localize.lr=-1": "must be > 0",
    "localize.seed=-1": "must be >= 0",
    "localize.model=yolo": "expected actionformer",
    "localize.n_kv_head=2": "localize.n_kv_head: grouped-query attention is backbone v2's",
    "localize.threads=0": "must be >= 1",
    "localize.threads=-1": "must be >= 1",
    "localize.nproc=0": "must be >= 1",
    "localize.nproc=two": "expected an integer",
    "localize.device=tpu": "expected auto, cpu, cuda or cuda:N",
    "localize.device=gpu": "expected auto, cpu, cuda or cuda:N",
    "localize.weight_decay=.nan": "must be finite",
    "localize.model.embed_dim=0": "must be >= 1",
    "localize.model.window=[9]": "localize.window: needs one window per level",
    "localize.max_seq_len=100": "localize.max_seq_len: must be a multiple of the largest stride",
    "localize.window=[9,9,9,200]": "localize.window: 200 at level 3 is longer than",
    "localize.regression_ranges=[[0,4],[8,16],[16,32],[32,64]]": "must cover the levels from 0 without gaps",
    "localize.regression_ranges=[[2,4],[4,8],[8,16],[16,64]]": "must cover the levels from 0 without gaps",
    "localize.regression_ranges=[[0,4],[4,8],[8,10000]]": "localize.regression_ranges: needs one [low, high] per level (4)",
    "localize.regression_ranges=wide": "localize.regression_ranges",
    "localize.preset=nope": "localize.preset: unknown preset",
    "localize_eval.nms_sigma=0": "must be > 0",
    "localize_eval.nms_sigma=-1": "must be > 0",
    "localize_eval.nms_sigma=.nan": "must be finite",
    "localize_eval.min_score=2": "must be <= 1",
    "localize_eval.min_score=-1": "must be >= 0",
    "localize_eval.tious=[]": "needs at least 1 value",
    "localize_eval.tious=[0.5,2]": "[1]: must be <= 1",
    "localize_eval.iou_threshold=x": "expected a finite number",
    "localize_eval.weights=best": "expected ema | model",
    "localize_eval.split=valid": "splits: no 'valid' split, which localize_eval.split names",
    "extract.fps=.nan": "must be finite",
    "extract.batch_size=0": "must be >= 1",
    "extract.video_timeout_s=0": "must be > 0",
    "extract.decoders=[]": "needs at least 1 value",
    "extract.decoders=[ffmpeg]": "expected decord | pyav",
    "extract.offset_frames=-1000": "must be >= 0",
    "extract.clip_len=100000": "must be <= 512 (512 frames of 224x224 are 0.3 GB",
    "extract.size=[64,64,64]": "takes at most 2 values",
    "extract.crop=[128,128]": "does not fit in frames resized to [64]",
    "extract.dtype=float64": "expected float16 | float32",
    "extract.backbone=resnet": "expected i3d",
    "extract.streams=depth": "expected rgb | flow | both",
    "extract.streams=both": "extract.streams: 'both' needs the i3d backbone",  # with the backbone below
    "extract.flow.estimator=farneback": "expected raft | tvl1",
    "extract.flow.arch=huge": "expected large | small | tiny",
    "extract.flow.iters=0": "must be >= 1",
    "extract.iters=100": "must be <= 64 (each is one GRU update",
    "extract.flow.bound=0": "must be > 0",
    "extract.flow.quantize=1": "expected true or false",
    "extract.flow_weights=raft-things.pth": "extract.flow_weights: no RAFT runs (streams is rgb)",
    "extract_keyframes.streams=flow": "extract_keyframes.streams: keyframe features are RGB only",
}


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _no_work(cache: Path) -> None:
    """Nothing generated, extracted or trained: at most the fingerprint index exists."""
    made = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert set(made) <= {"fingerprints.sqlite"}, made


@pytest.mark.parametrize("value", list(BAD_SETS))
def test_bad_set_value_exits_2_before_any_work(tmp_path, capsys, value):
    """On the demo: a bad value must be refused before the demo videos are even generated."""
    cache = tmp_path / "cache"
    sets = ["--set", value] + (["--set", "extract.backbone=r2plus1d_34"] if value == "extract.streams=both" else [])
    line = _fails(capsys, ["--cache-dir", str(cache), "run", "all", "--dataset", "demo", *sets], BAD_SETS[value])
    # a value refused alone names where it came from; one refused with the rest of its stage's config
    # names that stage's param, or (a split, a crop) the manifest or preset it does not fit
    stage = value.split(".")[0]
    assert (line.startswith(f"pipeline: error: --set {value}: ") or line.startswith(f"pipeline: error: {stage}.")
            or value in {"localize_eval.split=valid", "extract.crop=[128,128]"}), line
    _no_work(cache)


def test_bad_values_in_config_files_and_manifests_are_named_there(tmp_path, capsys):
    cache = tmp_path / "cache"
    exp = tmp_path / "exp.yaml"
    exp.write_text("localize: {train: {epochs: 0}}\n")
    _fails(capsys, ["--cache-dir", str(cache), "run", "all", "--dataset", "demo", "--config", str(exp)],
           f"{exp}: localize.train.epochs: must be >= 1")
    manifest = tmp_path / "d.yaml"
    manifest.write_text("name: d\ngenerate: {seed: 0}\nsplits: {train: train, test: test}\n"
                        "params: {localize: {preset: demo, model: {embd_dim: -4}}}\n")
    _fails(capsys, ["--cache-dir", str(cache), "run", "all", "--dataset", str(manifest)],
           f"{manifest}: params.localize.model.embd_dim: must be >= 1")
    _no_work(cache)


@pytest.mark.parametrize("generate,fragment", [
    ("{size: 1024, fps: 120, duration_s: [20, 600]}", "generate.duration_s: the longest video at fps 120 and size "
                                                      "1024 is 843.8 GiB of frames in memory"),
    ("{train_videos: 1000000000}", "generate.train_videos: must be <= 10000"),
    ("{fps: 1.5}", "generate.fps: expected an integer"),
    ("{size: 65}", "generate.size: must be even"),
])
def test_generator_values_are_bounded_before_generating(tmp_path, capsys, generate, fragment):
    manifest = tmp_path / "g.yaml"
    manifest.write_text(f"name: g\ngenerate: {generate}\nsplits: {{train: train, test: test}}\n")
    cache = tmp_path / "cache"
    _fails(capsys, ["--cache-dir", str(cache), "run", "all", "--dataset", str(manifest)], fragment)
    _no_work(cache)


@pytest.mark.parametrize("argv,fragment", [
    (["--cache-dir", "", "status"], "--cache-dir: expected a path, got ''"),
    (["--cache-dir=", "status"], "--cache-dir: expected a path, got ''"),
    (["--stages", " ", "status"], "--stages: expected a path"),
])
def test_empty_paths_are_refused(capsys, argv, fragment):
    _fails(capsys, argv, fragment)


def test_cache_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    _fails(capsys, ["--cache-dir", str(f), "status", "--dataset", "demo"], f"--cache-dir {f}: not a directory")


def test_unknown_keys_are_errors_with_near_matches(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    _fails(capsys, ["--cache-dir", cache, "status", "--dataset", "demo", "--set", "localize.weight_decy=0.1"],
           "unknown param localize.weight_decy; did you mean localize.weight_decay")
    _fails(capsys, ["--cache-dir", cache, "status", "--dataset", "demo", "--set", "localize.model.embed_dm=8"],
           "unknown param localize.model.embed_dm; did you mean localize.model.embed_dim")
    _fails(capsys, ["--cache-dir", cache, "status", "--dataset", "demo", "--set", "localize.train.embed_dim=8"],
           "unknown param localize.train.embed_dim")
    _fails(capsys, ["--cache-dir", cache, "status", "--dataset", "demo", "--set", "localize.epochs.x=8"],
           "localize.epochs is not a mapping")
    _fails(capsys, ["--cache-dir", cache, "status", "--dataset", "demo", "--set", "extract.flow.iter=3"],
           "unknown param extract.flow.iter; did you mean extract.flow.iters")


# ---------------------------------------------------------------- keys, on imported features


@pytest.fixture
def mini(tmp_path):
    """Imported synthetic features (so extract is done without videos) and their annotations."""
    src = tmp_path / "feats"
    src.mkdir()
    db = {}
    for subset, videos in (("validation", make_videos(4, 0, length=(40, 60))), ("test", make_videos(2, 1, (40, 60)))):
        for vid, (feats, actions) in videos.items():
            np.save(src / f"{vid}.npy", feats)
            db[vid] = {"subset": subset, "duration": (STRIDE * len(feats) + CLIP) / FPS, "fps": FPS,
                       "annotations": [{"segment": [a, b], "label": c} for a, b, c in actions]}
    (tmp_path / "ann.json").write_text(json.dumps({"database": db}))
    manifest = tmp_path / "mini.yaml"
    manifest.write_text("name: mini\ntask: localize\nannotations: ann.json\nsplits: {train: validation, test: test}\n"
                        "params: {localize: {preset: demo, epochs: 1, warmup_epochs: 0, embed_dim: 16}}\n")
    cache = tmp_path / "cache"
    assert main(["--cache-dir", str(cache), "import-features", str(src), "--dataset", str(manifest),
                 "--format", "npy", "--stride", str(STRIDE), "--clip-len", str(CLIP)]) == 0
    return manifest, cache


def _keys(capsys, manifest: Path, cache: Path, *args: str) -> dict:
    capsys.readouterr()
    assert main(["--cache-dir", str(cache), "--json", "status", "--dataset", str(manifest), *args]) == 0
    (ds,) = json.loads(capsys.readouterr().out)["datasets"]
    return {s["stage"]: (s["key"], s["state"]) for s in ds["stages"]}


def test_nested_flat_and_config_file_name_one_param(mini, capsys, tmp_path):
    manifest, cache = mini
    default = _keys(capsys, manifest, cache)["localize"][0]
    nested = _keys(capsys, manifest, cache, "--set", "localize.model.embed_dim=32")["localize"][0]
    flat = _keys(capsys, manifest, cache, "--set", "localize.embed_dim=32")["localize"][0]
    alias = _keys(capsys, manifest, cache, "--set", "localize.model.embd_dim=32")["localize"][0]
    exp = tmp_path / "exp.yaml"
    exp.write_text("localize: {model: {embd_dim: 32}}\n")
    from_file = _keys(capsys, manifest, cache, "--config", str(exp))["localize"][0]
    assert default is not None and nested != default and nested == flat == alias == from_file
    # every field of the preset's dataclasses is a param
    assert _keys(capsys, manifest, cache, "--set", "localize.weight_decay=0.01")["localize"][0] != default
    # --set wins over --config
    assert _keys(capsys, manifest, cache, "--config", str(exp), "--set", "localize.embed_dim=16")["localize"][0] \
        == _keys(capsys, manifest, cache, "--set", "localize.embed_dim=16")["localize"][0]


def test_a_manifest_without_the_eval_split_is_refused_before_training(mini, capsys):
    manifest, cache = mini
    manifest.write_text(manifest.read_text().replace(", test: test}", "}"))
    _fails(capsys, ["--cache-dir", str(cache), "run", "all", "--dataset", str(manifest)],
           f"{manifest}: splits: no 'test' split, which localize_eval.split names (has train)")
    assert not (cache / "localize").exists()


def test_the_config_json_of_a_training_run_makes_the_same_key(mini, capsys):
    manifest, cache = mini
    capsys.readouterr()
    argv = ["--cache-dir", str(cache), "--json", "run", "train", "--stage", "localize", "--dataset", str(manifest)]
    assert main([*argv, "--set", "localize.lr=2e-3", "--set", "localize.threads=1"]) == 0
    (report,) = [s for s in json.loads(capsys.readouterr().out)["stages"] if s["name"] == "localize"]
    assert report["status"] == "ran"
    config = Path(report["dir"]) / "config.json"
    saved = json.loads(config.read_text())["params"]
    assert saved["localize"]["lr"] == 2e-3 and saved["localize"]["threads"] == 1 and "extract" in saved
    keys = _keys(capsys, manifest, cache, "--config", str(config))
    assert keys["localize"] == (report["key"], "done")
    assert main([*argv, "--config", str(config)]) == 0
    (again,) = [s for s in json.loads(capsys.readouterr().out)["stages"] if s["name"] == "localize"]
    assert again["status"] == "cached" and again["key"] == report["key"]
    # localize_eval's test settings are params, by either name
    evals = {_keys(capsys, manifest, cache, "--config", str(config), *a)["localize_eval"][0] for a in
             ([], ["--set", "localize_eval.test.nms_sigma=0.3"], ["--set", "localize_eval.nms_sigma=0.3"])}
    assert len(evals) == 2 and None not in evals


# ---------------------------------------------------------------- any stage plugs in its own schema

TOY_SCHEMA = '''\
from dataclasses import dataclass
from typing import Annotated

from pipeline.errors import ConfigError
from pipeline.schema import Range


@dataclass(frozen=True)
class Format:
    width: Annotated[int, Range(ge=0, le=80)] = 0


@dataclass(frozen=True)
class TotalParams:
    scale: Annotated[int, Range(ge=1, le=1000)] = 1
    fmt: Format = Format()

    @classmethod
    def check_params(cls, params, upstream):
        if params.get("scale", 1) * 10 < (params.get("width") or 0):
            raise ConfigError("total.width: wider than ten times the scale")
'''


TOY_TOTAL = '''\
import json

from pipeline.schema import apply
from toytotal.config import TotalParams
from toytotal.fmt import render


def total(ctx):
    p = apply(TotalParams(), ctx.params)  # flat params onto the sections
    records = sorted((ctx.upstream["upper"] / "items").glob("*.json"))
    value = sum(json.loads(r.read_text())["chars"] for r in records) * p.scale
    (ctx.out_dir / "total.txt").write_text(render(value, p.fmt.width))
'''


def test_a_stage_declares_its_schema_class_in_stages_yaml(toy):
    """The mechanism is generic: the toy's stage plugs in a schema with a nested section and a check."""
    toy.write("toytotal/config.py", TOY_SCHEMA)
    toy.write("toytotal/stage.py", TOY_TOTAL)
    stages = toy.root / "stages.yaml"
    stages.write_text(stages.read_text().replace("    params: {scale: 1, fmt: {width: 0}}\n",
                                                 "    schema: {params: toytotal.config:TotalParams}\n"
                                                 "    params: {scale: 1}\n"))
    for value, fragment in (("total.scale=0", "must be >= 1"), ("total.fmt.width=x", "expected an integer"),
                            ("total.width=81", "must be <= 80"), ("total.scal=2", "did you mean total.scale"),
                            ("total.width=30", "total.width: wider than ten times the scale")):
        proc = toy.cli("run", "total", "--dataset", "toy", "--set", value, check=2)
        assert fragment in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert toy.work("upper") == []
    out = toy.run("--set", "total.fmt.width=12", "--set", "total.scale=2")
    assert out["by_stage"]["total"]["status"] == "ran"
    assert (toy.cache / "total" / out["by_stage"]["total"]["key"] / "total.txt").read_text() == "36".rjust(12)
    # the flat name is the same key
    assert toy.run("--set", "total.width=12", "--set", "total.scale=2")["by_stage"]["total"]["status"] == "cached"
    stages.write_text(stages.read_text().replace("toytotal.config:TotalParams", "toytotal.nope:TotalParams"))
    proc = toy.cli("status", "--dataset", "toy", check=2)
    assert "stages.total.schema.params: cannot import toytotal.nope:TotalParams" in proc.stderr
    stages.write_text(stages.read_text().replace("schema: {params:", "schema: {parms:"))
    proc = toy.cli("status", "--dataset", "toy", check=2)
    assert "stages.total.schema.parms: unknown field; known: params, runtime" in proc.stderr
