"""The localize half as a researcher lives in it, through the CLI, on imported features: ActivityNet-style
videos shorter than the coarsest stride train; evaluation on partial features tells the truth; named
experiments are listed and compared; gc keeps imports and experiments and removes dead partials."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from localize_synthetic import CLIP, FPS, STRIDE, make_videos
from pipeline.cli import main

FAST = "{preset: demo, epochs: 12, warmup_epochs: 1, batch_size: 4, threads: 1}\n  localize_eval: {weights: model}"


def _dataset(root: Path, train: dict, test: dict, localize: str, with_features: set | None = None) -> Path:
    """Annotations + a manifest whose videos sit behind an unset variable, and its features imported
    (all, or only the ids in ``with_features``)."""
    db, feats = {}, root / "feats"
    feats.mkdir(parents=True)
    for subset, videos in (("Validation", train), ("Test", test)):
        for vid, (f, actions) in videos.items():
            db[vid] = {"subset": subset, "duration": (STRIDE * len(f) + CLIP) / FPS, "fps": FPS,
                       "annotations": [{"segment": [a, b], "label": c} for a, b, c in actions]}
            if with_features is None or vid in with_features or subset == "Validation":
                np.save(feats / f"{vid}.npy", f)
    (root / "ann.json").write_text(json.dumps({"database": db}))
    manifest = root / "toy.yaml"
    manifest.write_text(f"name: toy\ntask: localize\nvideos: ${{TOY_VIDEOS_UNSET}}\nannotations: ann.json\n"
                        f"splits: {{train: validation, test: test}}\nparams:\n  localize: {localize}\n")
    assert main(["--cache-dir", str(root / "cache"), "import-features", str(feats), "--dataset", str(manifest),
                 "--format", "npy", "--fps", str(FPS), "--stride", str(STRIDE), "--clip-len", str(CLIP),
                 "--dtype", "float32"]) == 0
    return manifest


def _cli(cache: Path, *args: str) -> int:
    return main(["--cache-dir", str(cache), *args])


def test_activitynet_style_videos_shorter_than_the_coarsest_stride_train_and_evaluate(tmp_path, capsys):
    # 12-30 feature steps as stored; the anet_tsp model (6 levels, stride 32) sees them resized to 192
    videos = make_videos(10, seed=5, length=(12, 30))
    assert all(len(f) < 32 for f, _ in videos.values())
    train = dict(list(videos.items())[:7])
    test = dict(list(videos.items())[7:])
    manifest = _dataset(tmp_path, train, test, "{preset: anet_tsp, embed_dim: 32, epochs: 1, warmup_epochs: 1, "
                                               "batch_size: 4, threads: 1}")
    capsys.readouterr()
    assert _cli(tmp_path / "cache", "run", "all", "--dataset", str(manifest)) == 0
    out, err = capsys.readouterr()
    # two optimizer steps: the EMA weights (evaluated by default) are still mostly the random ones
    assert "localize_eval: warning: the EMA weights are 100% the random initial weights after 2 steps" in err
    assert "localize: 1 torch thread (as set)" in err
    assert "toy detection mAP (%) (ActivityNet protocol, tIoU 0.50:0.95) over" in out and ", 3 videos" in out
    eval_dir = next((tmp_path / "cache" / "localize_eval").iterdir())
    assert json.loads((eval_dir / "metrics.json").read_text())["n_videos"] == 3


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """Training on every train video; features for 3 of the 6 test videos; run as experiment `base`."""
    root = tmp_path_factory.mktemp("partial")
    test = make_videos(6, seed=2)
    manifest = _dataset(root, make_videos(8, seed=1), test, FAST, with_features=set(sorted(test)[:3]))
    assert _cli(root / "cache", "run", "all", "--dataset", str(manifest), "--name", "base") == 0
    return root, manifest


def test_run_eval_scores_the_videos_with_features_and_says_how_many(partial, capsys):
    root, manifest = partial
    cache = root / "cache"
    assert _cli(cache, "run", "eval", "--stage", "localize", "--dataset", str(manifest)) == 0
    out = capsys.readouterr().out
    assert "localize_eval: evaluated 3 of the 6 videos of split test (test): the others have no features" in out
    eval_dir = next(d for d in (cache / "localize_eval").iterdir() if not d.name.endswith(".partial"))
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["n_videos"] == 3 and metrics["n_videos_gt"] == 6
    # the same detections scored against all 6 videos count the other 3 as misses, and say so
    det = str(eval_dir / "detections.json")
    assert _cli(cache, "--json", "evaluate", "localize", "--annotations", str(root / "ann.json"),
                "--detections", det, "--subset", "test") == 0
    captured = capsys.readouterr()
    everything = json.loads(captured.out)
    assert "detections cover 3 of the 6 evaluated videos" in captured.err and "--only-detected" in captured.err
    assert everything["n_videos"] == 6 and everything["average_mAP"] < metrics["average_mAP"]
    assert _cli(cache, "--json", "evaluate", "localize", "--annotations", str(root / "ann.json"),
                "--detections", det, "--subset", "test", "--only-detected") == 0
    only = json.loads(capsys.readouterr().out)
    assert only["mAP"] == pytest.approx(metrics["mAP"])
    # the other formats hold the same detections
    results = json.loads((eval_dir / "detections.json").read_text())["results"]
    n = sum(len(v) for v in results.values())
    pkl = pickle.loads((eval_dir / "results.pkl").read_bytes())
    assert len(pkl["video-id"]) == n and len(pkl["t-start"]) == n and pkl["label"].dtype == np.int64
    lines = (eval_dir / "detections_thumos14.txt").read_text().splitlines()
    assert len(lines) == n and len(lines[0].split()) == 5


def test_named_experiments_are_listed_and_compared(partial, capsys):
    root, manifest = partial
    cache = root / "cache"
    assert _cli(cache, "run", "all", "--dataset", str(manifest), "--name", "short",
                "--set", "localize.epochs=1", "--set", "localize.weight_decay=0.02") == 0
    capsys.readouterr()
    assert _cli(cache, "runs", "--dataset", "toy") == 0
    out = capsys.readouterr().out
    assert "dataset toy, stage localize_eval (mAP %)" in out and "@0.30" in out and "avg" in out
    rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    assert "localize.epochs=1" in rows["short"] and rows["base"].rstrip().endswith("-")
    # a field that neither stages.yaml nor the manifest lists is shown too when set
    assert "localize.weight_decay=0.02" in rows["short"]
    assert " done " in rows["base"] and " done " in rows["short"]
    assert _cli(cache, "compare", "base", "short", "--plot", str(root / "pr.svg"), "--classes", "jump,run") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[-2:] == ["base", "short"]
    assert any(line.split()[:3] == ["localize.epochs", "12", "1"] for line in lines), out
    assert any(line.startswith("@0.50") for line in lines) and any(line.startswith("jump") for line in lines)
    assert (root / "pr.svg").read_text().startswith("<?xml") and f"wrote {root / 'pr.svg'}" in out
    assert _cli(cache, "compare", "base", "nosuch") == 2
    assert "no finished run named 'nosuch'" in capsys.readouterr().err


def test_status_says_not_run_for_a_configuration_that_never_ran(partial, capsys):
    root, manifest = partial
    capsys.readouterr()
    assert _cli(root / "cache", "--json", "status", "--dataset", str(manifest), "--set", "localize.epochs=7") == 0
    states = {s["stage"]: s for s in json.loads(capsys.readouterr().out)["datasets"][0]["stages"]}
    assert states["localize"]["state"] == "not run" and states["localize_eval"]["state"] == "blocked"
    assert any("param localize.epochs" in r for r in states["localize"]["reasons"])


def test_gc_keeps_imports_and_named_experiments_and_removes_dead_partials(partial, capsys):
    root, manifest = partial
    cache = root / "cache"
    assert _cli(cache, "run", "all", "--dataset", str(manifest), "--set", "localize.epochs=3") == 0  # anonymous
    anonymous = {d for d in (cache / "localize").iterdir()}
    dead = cache / "localize" / "0123456789abcdef01234567.partial"
    dead.mkdir()
    other = root / "other.yaml"  # a dataset whose keys cannot be computed (its ${VAR} is unset)
    other.write_text("name: other\ntask: localize\nvideos: ${OTHER_VIDEOS_UNSET}\nannotations: ann.json\n"
                     "splits: {train: validation, test: test}\n")
    capsys.readouterr()
    assert _cli(cache, "gc", "--dataset", str(manifest), "--dataset", str(other)) == 0
    out = capsys.readouterr().out
    assert f"removed {dead}" in out and not dead.exists()
    assert "imported features of" in out and "named experiment base" in out and "named experiment short" in out
    assert "anonymous experiment (pipeline gc --experiments removes it)" in out, out
    assert all(d.exists() for d in anonymous)
    assert _cli(cache, "gc", "--experiments", "--dataset", str(manifest)) == 0
    out = capsys.readouterr().out
    removed = [d for d in anonymous if not d.exists()]
    assert len(removed) == 1 and f"removed {removed[0]}" in out
    # named experiments and the imported store survive; their runs are still listed
    assert _cli(cache, "runs") == 0
    out = capsys.readouterr().out
    assert "base" in out and "short" in out
    reg = json.loads(next((cache / "imports").iterdir()).read_text())
    assert (Path(reg["dir"]) / "manifest.json").is_file()


def test_plots_stay_bounded_with_200_classes_and_print_no_warnings(tmp_path, recwarn):
    pytest.importorskip("matplotlib")
    import struct

    from localizers import plots

    classes = [f"class_{k:03d}" for k in range(200)]
    truth = [(c, 10.0 * k % 100, 10.0 * k % 100 + 5) for k, c in enumerate(classes)]
    preds = [(c, 0.5, 10.0 * k % 100, 10.0 * k % 100 + 4) for k, c in enumerate(classes)]
    feats, times = np.random.default_rng(0).random((50, 8)), np.arange(50) * 2.0
    plots.draw_timeline(tmp_path / "t.png", "v", 100.0, classes, truth, preds, feats, times)
    curves = {c: (np.ones((1, 3)), np.linspace(0.3, 1, 3)[None]) for c in classes}
    plots.draw_pr_curves(tmp_path / "pr.png", curves, (0.5,), np.ones((1, 200)))
    for name in ("t.png", "pr.png"):
        width, height = struct.unpack(">II", (tmp_path / name).read_bytes()[16:24])
        assert width <= 1500 and height <= 3000, (name, width, height)
    plots.draw_pr_curves(tmp_path / "pr.pdf", dict(list(curves.items())[:2]), (0.5,), np.ones((1, 2)))
    assert (tmp_path / "pr.pdf").read_bytes()[:4] == b"%PDF"
    assert not [w for w in recwarn if "matplotlib" in str(w.filename)]
