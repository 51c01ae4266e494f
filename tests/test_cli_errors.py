"""Every bad input exits 2 with one line naming the file and the field; planning stays light."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.datasets import generation_record

PROJECT = Path(__file__).resolve().parent.parent


def edit(rel: str, old: str, new: str):
    def apply(toy):
        p = toy.root / rel
        text = p.read_text()
        assert old in text
        p.write_text(text.replace(old, new))
    return apply


def write(rel: str, text: str):
    return lambda toy: toy.write(rel, text)


def remove_videos(toy):
    for p in toy.videos.iterdir():
        p.unlink()
    toy.videos.rmdir()


CASES = {
    "unknown stage field": (edit("stages.yaml", "per_item: true", "per_item: true\n    colour: red"),
                            ["run", "upper"], ["stages.yaml: stages.upper.colour: unknown field"]),
    "cycle": (edit("stages.yaml", "    per_item: true", "    needs: [total]\n    per_item: true"),
              ["status"], ["stages.yaml: stages.", ".needs: cycle"]),
    "unknown need": (edit("stages.yaml", "needs: [upper]", "needs: [uper]"),
                     ["status"], ["stages.yaml: stages.total.needs: unknown stage 'uper'"]),
    "entry function missing": (edit("stages.yaml", "toytotal.stage:total", "toytotal.stage:totl"),
                               ["run", "total"], ["stages.yaml: stages.total.entry: ", "no top-level 'totl'"]),
    "entry module missing": (edit("stages.yaml", "toyupper:upper", "toyupper.nope:upper"),
                             ["run", "total"], ["stages.yaml: stages.upper.entry: module 'toyupper.nope'"]),
    "entry fails on import": (write("toyupper/__init__.py", "import no_such_package_here\n\ndef upper(ctx):\n    pass\n"),
                              ["run", "total"], ["stages.yaml: stages.upper.entry: cannot import", "no_such_package"]),
    "unset variable": (write("data/toy.yaml", "name: toy\nvideos: ${TOY_UNSET_VIDEOS_DIR}/v\n"),
                       ["run", "upper"], ["data/toy.yaml: videos: environment variable TOY_UNSET_VIDEOS_DIR"]),
    "missing videos dir": (remove_videos, ["run", "upper"], ["data/toy.yaml: videos: directory not found: ",
                                                             "/videos"]),
    "missing annotations": (write("data/toy.yaml", "name: toy\nvideos: ../videos\nannotations: gt.json\n"),
                            ["run", "upper"], ["data/toy.yaml: annotations: not found: ", "data/gt.json"]),
    "unknown manifest field": (write("data/toy.yaml", "name: toy\nvidoes: ../videos\n"),
                               ["run", "upper"], ["data/toy.yaml: vidoes: unknown field"]),
    "bad task": (write("data/toy.yaml", "name: toy\ntask: segment\nvideos: ../videos\n"),
                 ["status"], ["data/toy.yaml: task: expected one of localize, detect"]),
    "manifest params of unknown stage": (write("data/toy.yaml", "name: toy\nvideos: ../videos\nparams: {up: {}}\n"),
                                         ["run", "upper"], ["data/toy.yaml: params.up: unknown stage"]),
    "unknown --set stage": (None, ["run", "upper", "--set", "uper.repeat=2"],
                            ["--set uper.repeat=2: unknown stage 'uper'; known: upper, total"]),
    "unknown --set param": (None, ["run", "upper", "--set", "upper.rep=2"],
                            ["--set upper.rep=2: unknown param upper.rep; known: repeat, weights, delay, fail, gate"]),
    "missing file param": (None, ["run", "upper", "--set", "upper.weights=nope.pt"],
                           ["upper.weights: file not found: nope.pt"]),
    "unknown stage to run": (None, ["run", "uper"], ["run uper: unknown stage; known: upper, total"]),
    "train without --stage": (None, ["run", "train"], ["run train: --stage is required"]),
    "missing --dataset": (None, ["run", "upper", "--dataset"], ["--dataset: expected one argument"]),
    "bad backend": (None, ["run", "upper", "--backend", "spark"], ["--backend: invalid choice: 'spark'"]),
    "unknown command": (None, ["frobnicate"], ["unknown command 'frobnicate'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(toy, case, capsys, monkeypatch):
    """In-process ``main()`` (fast); every case fails before any toy module is imported for good."""
    mutate, args, fragments = CASES[case]
    if mutate:
        mutate(toy)
    if args[0] in ("run", "status") and "--dataset" not in args:
        args = [*args, "--dataset", "toy"]
    monkeypatch.chdir(toy.root)
    monkeypatch.setenv("TOY_COUNTS", str(toy.counts))
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(toy.argv(*args)[3:]) == 2
    for name in [m for m in sys.modules if m.startswith("toy")]:
        del sys.modules[name]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("pipeline: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert toy.work("upper") == []


def test_unknown_dataset_lists_the_known_manifests(toy):
    proc = toy.cli("run", "upper", "--dataset", "toyy", check=2)
    assert re.fullmatch(r"pipeline: error: --dataset toyy: no manifest .*/data/toyy\.yaml; known: toy .*\n",
                        proc.stderr)


def test_debug_shows_the_traceback(toy):
    proc = toy.cli("--debug", "run", "upper", "--dataset", "toy", "--set", "uper.x=1", check=2)
    assert "Traceback" in proc.stderr and proc.stderr.strip().endswith("known: upper, total")


def test_json_is_one_object_on_stdout(toy):
    proc = toy.cli("run", "total", "--dataset", "toy", "--json")
    assert json.loads(proc.stdout)["exit_code"] == 0
    proc = toy.cli("--json", "status", "--dataset", "toy")
    assert [s["state"] for s in json.loads(proc.stdout)["datasets"][0]["stages"]] == ["done", "done"]


HEAVY = ("torch", "zarr", "h5py", "decord", "numpy", "extractors", "localizers", "detectors")
# Planning imports the schema modules stages.yaml declares (import-light by contract) and what they import
# from their own package; nothing else of a domain.
SCHEMA_MODULES = {"extractors", "extractors.presets", "extractors.registry", "localizers", "localizers.config",
                  "detectors", "detectors.config"}
_LIST_MODULES = ("import atexit, json, runpy, sys; sys.argv = ['pipeline'] + sys.argv[1:]; "
                 "atexit.register(lambda: print('MODULES', json.dumps(sorted(sys.modules)), file=sys.stderr)); "
                 "runpy.run_module('pipeline.cli', run_name='__main__')")


def imported_modules(argv: list[str], env: dict, cwd: Path) -> set[str]:
    """Every module a command leaves in ``sys.modules`` (importtime misses ``importlib.import_module``)."""
    assert argv[:2] == ["-m", "pipeline.cli"]
    proc = subprocess.run([sys.executable, "-c", _LIST_MODULES, *argv[2:]], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("MODULES ")]
    return set(json.loads(line[len("MODULES "):]))


def test_planning_imports_no_heavy_or_domain_package(toy, tmp_path):
    toy.run()
    noop = imported_modules(toy.argv("run", "total", "--dataset", "toy")[1:], toy.env, toy.root)
    status = imported_modules(toy.argv("status", "--dataset", "toy")[1:], toy.env, toy.root)
    videos = tmp_path / "thumos_videos"
    videos.mkdir()
    (videos / "video_test_0000004.mp4").write_bytes(b"\0" * 64)
    env = dict(toy.env, THUMOS_VIDEOS=str(videos))
    project = imported_modules(["-m", "pipeline.cli", "--cache-dir", str(tmp_path / "cache"), "status"], env,
                               PROJECT)
    # a generated (demo) dataset recorded by an earlier run: its generator is not even imported
    toy.write("data/gen.yaml", "name: gen\ngenerate: {seed: 3}\n")
    record = generation_record(toy.cache, "gen", {"seed": 3})
    toy.write("gen_annotations.json", "{\"database\": {}}")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"videos": str(toy.videos), "annotations": str(toy.root / "gen_annotations.json")}))
    toy.cli("run", "total", "--dataset", "gen")
    generated = imported_modules(toy.argv("run", "total", "--dataset", "gen")[1:], toy.env, toy.root)
    for mods in (noop, status, project, generated):
        heavy = sorted(m for m in mods if (m.split(".")[0] in HEAVY and m not in SCHEMA_MODULES)
                       or m == "pipeline.demo_data")
        assert not heavy, heavy
    assert "toytotal" not in noop  # a cached stage's entry is never imported


@pytest.mark.parametrize("argv,fragment", [
    (["weights", "--bogus"], "pipeline weights: unrecognized arguments: --bogus"),
    (["evaluate", "localize"], "pipeline evaluate localize: the following arguments are required"),
    (["show", "localize", "--bogus"], "pipeline show localize: unrecognized arguments: --bogus"),
    (["verify", "--bogus"], "pipeline verify: unrecognized arguments: --bogus"),
    (["import-features", "feats"], "pipeline import-features: the following arguments are required: --dataset"),
])
def test_domain_command_usage_errors_are_one_line(tmp_path, capsys, argv, fragment):
    assert main(["--cache-dir", str(tmp_path), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline: error: ") and fragment in lines[0], lines
