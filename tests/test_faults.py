"""Faults through the CLI: odd files, killed drivers, gc beside a run, crash leftovers, untrusted
checkpoints, environment errors, and a seeded subset of the fault campaign (bench/faults.py)."""

from __future__ import annotations

import json
import os

import pytest


def _failures(toy, stage: str, key: str) -> list[dict]:
    path = toy.cache / stage / key / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_odd_files_fail_alone_and_the_dataset_goes_on(toy):
    v = toy.videos
    os.symlink("loop.mp4", v / "loop.mp4")
    os.symlink("missing-target.mp4", v / "dangling.mp4")
    (v / "folder.mp4").mkdir()
    os.mkfifo(v / "pipe.mp4")
    toy.write("videos/a.mkv", "another a")  # two files with one stem: both are named, neither runs
    status = toy.status()
    assert any("symlink loop" in r for r in status["upper"]["reasons"])
    out = toy.run(stage="upper", check=1)
    upper = out["by_stage"]["upper"]
    assert sorted(toy.work("upper")) == ["b", "c"]
    assert upper["items"] == {"total": 8, "done": 2, "skipped": 0, "failed": 6}
    why = {f["id"]: f["message"] for f in _failures(toy, "upper", upper["key"])}
    assert why["loop.mp4"] == "symlink loop"
    assert why["dangling.mp4"].startswith("dangling symlink")
    assert "directory" in why["folder.mp4"] and "FIFO" in why["pipe.mp4"]
    assert "a.mkv and a.mp4" in why["a.mp4"] and why["a.mp4"] == why["a.mkv"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_user_checkpoints_are_read_as_weights_only(tmp_path, monkeypatch):
    """A checkpoint that would run code on load is refused with the reason, in one line; so is a file
    that is not a checkpoint at all."""
    import pickle

    import torch

    from localizers.actionformer import build_model
    from localizers.checkpoint_compat import load_checkpoint
    from localizers.config import PRESETS
    from pipeline.errors import ConfigError
    from pipeline.untrusted import load_pickle

    monkeypatch.chdir(tmp_path)
    model = build_model(PRESETS["demo"].with_dims(16, 2))
    evil = tmp_path / "epoch_034.pth.tar"
    torch.save({"state_dict_ema": model.state_dict(), "extra": _RunsCode()}, evil)
    with pytest.raises(ConfigError, match=r"epoch_034\.pth\.tar: refused: loading it would run code named in "
                                          r"the file \((posix|os)\.system\)") as err:
        load_checkpoint(model, evil)
    assert "\n" not in str(err.value) and not (tmp_path / "pwned").exists()
    junk = tmp_path / "notes.pt"
    junk.write_text("these are my notes, not weights")
    with pytest.raises(ConfigError, match=r"notes\.pt: cannot read as a PyTorch checkpoint"):
        load_checkpoint(model, junk)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict_ema": model.state_dict(), "epoch": 34}, plain)
    load_checkpoint(model, plain)  # a plain official-layout file still loads
    feats = tmp_path / "v.pkl"
    feats.write_bytes(pickle.dumps({"feats": _RunsCode()}))
    with pytest.raises(ConfigError, match=r"v\.pkl: refused: .*\((posix|os)\.system\)"):
        load_pickle(feats)
    assert not (tmp_path / "pwned").exists()


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_writes_are_reported_and_cleaned(toy):
    out = toy.run("--set", "total.scale=2")
    upper_key, total_key = out["by_stage"]["upper"]["key"], out["by_stage"]["total"]["key"]
    dead = _dead_pid()
    items = toy.cache / "upper" / upper_key / "items"
    stale = items / f".a.json.{dead}.tmp"
    live = items / f".b.json.{os.getpid()}.tmp"  # a write in flight: never touched
    stale.write_text("{")
    live.write_text("{")
    # a killed training attempt's checkpoint inside the partial output the next run resumes
    partial = toy.cache / "total" / f"{total_key}.partial"
    partial.mkdir()
    (partial / f".checkpoint.pt.{dead}.tmp").write_bytes(b"half")
    proc = toy.cli("--json", "verify", check=1)
    assert json.loads(proc.stdout)["leftovers"] == [str(partial / f".checkpoint.pt.{dead}.tmp"), str(stale)]
    (toy.cache / "total" / total_key).rename(toy.cache / "total" / "elsewhere")  # make total run again
    toy.run("--set", "total.scale=2")
    assert not (partial / f".checkpoint.pt.{dead}.tmp").exists()
    assert not list((toy.cache / "total" / total_key).glob(".*.tmp"))
    proc = toy.cli("--json", "gc")
    assert json.loads(proc.stdout)["leftovers"] == [str(stale)]
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("case", ["file as cache dir", "directory as stages file", "read-only cache"])
def test_environment_errors_are_one_line_naming_path_and_cause(toy, case, tmp_path):
    import subprocess

    argv = toy.argv("run", "upper", "--dataset", "toy")
    if case == "file as cache dir":
        blocker = toy.write("blocker", "x")
        argv[argv.index("--cache-dir") + 1] = str(blocker)
        want = f"pipeline: error: {blocker}/"
        cause = "a file where a directory is expected"
    elif case == "directory as stages file":
        argv[argv.index("--stages") + 1] = str(toy.root)
        want, cause = f"pipeline: error: {toy.root}: ", "is a directory where a file is expected"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a read-only tmpfs here")
        argv[argv.index("--cache-dir") + 1] = str(ro / "cache")
        want, cause = f"pipeline: error: {ro}/cache: ", "read-only file system"
    try:
        proc = subprocess.run(argv, cwd=toy.root, env=toy.env, capture_output=True, text=True, timeout=60)
    finally:
        if case == "read-only cache":
            subprocess.run(["umount", str(tmp_path / "ro")])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(want) and lines[0].endswith(cause), lines[0]
    assert "Error" not in lines[0]
