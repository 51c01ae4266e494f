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

    from localizers.models import build_model
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
        # refused when the options are read, before anything is planned
        want, cause = f"pipeline: error: --cache-dir {blocker}", "not a directory"
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


def _campaign(tmp_path, seed: int):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.faults import Campaign

    return Campaign(tmp_path / "campaign", seed, log=lambda msg: None)


def test_killed_runs_leave_no_lock_no_orphan_and_lose_no_record(tmp_path):
    """The driver killed with SIGKILL, SIGTERM and just after a record, a decode worker killed: no process
    outlives a run, the next run starts at once (--no-wait: a stale lock would fail it), and every record
    written before a kill survives to the final, complete store."""
    c = _campaign(tmp_path, seed=3)
    c.kills(4, reference=False, videos=(2, 1), modes=("driver-9", "driver-term", "mid-write", "worker"))
    assert c.counts["kills survived"] >= 3, c.notes
    for kind in ("hangs", "tracebacks", "wrong exit codes", "records lost"):
        assert c.counts[kind] == 0, c.notes


def test_fuzzed_inputs_end_cleanly_seeded_subset(tmp_path):
    """Seeded manifests and stages files, and --set values the core refuses: no hang, no traceback, exit
    codes as documented, invalid input refused. (Annotation files, which train, and --set values whose
    refusal is the parameter validation's are run by bench/faults.py.)"""
    c = _campaign(tmp_path, seed=11)
    c.fuzz(10, sets=("core",), kinds=("manifest", "stages"))
    assert c.counts["fuzzed inputs"] == 10 + 8, c.notes
    for kind in ("hangs", "tracebacks", "wrong exit codes", "invalid values accepted"):
        assert c.counts[kind] == 0, c.notes


GATED_TOTAL = '''\
import json
import os
import time

from toyupper import _count


def total(ctx):
    records = sorted((ctx.upstream["upper"] / "items").glob("*.json"))
    _count("total", "reading")
    while not os.path.exists(os.environ["TOTAL_GATE"]):
        time.sleep(0.01)  # the test runs gc here, while this stage reads upper's output
    value = sum(json.loads(r.read_text())["chars"] for r in records)
    data = sorted(p.name for p in (ctx.upstream["upper"] / "data").iterdir())
    (ctx.out_dir / "total.txt").write_text(str(value))
    return {"summary": f"total = {value}", "value": value, "data": data}
'''


def test_gc_beside_a_run_deletes_nothing_it_reads_or_writes(toy):
    """gc while a run (on keys no manifest makes a root) writes upper, then while total reads upper's
    output: both are held, reported as such, and survive; the run completes."""
    import time

    gate_upper, gate_total = toy.root / "gate-upper", toy.root / "gate-total"
    toy.write("toytotal/stage.py", GATED_TOTAL)
    toy.env["TOTAL_GATE"] = str(gate_total)
    run = toy.popen("--json", "run", "total", "--dataset", "toy", "--set", "upper.repeat=3",
                    "--set", f"upper.gate={gate_upper}")

    def until(cond):
        deadline = time.time() + 30
        while not cond() and time.time() < deadline:
            time.sleep(0.02)
        assert cond()

    def gc_held() -> list[str]:
        res = json.loads(toy.cli("--json", "gc").stdout)
        assert res["removed"] == [], res
        return res["held"]

    until(lambda: len(toy.work("upper")) == 1)  # upper is writing its key
    assert [p.split("/")[-2] for p in gc_held()] == ["upper"]
    gate_upper.touch()
    until(lambda: toy.work("total") == ["reading"])  # total reads upper's output and writes its partial
    assert sorted(p.split("/")[-2] for p in gc_held()) == ["total", "upper"]
    gate_total.touch()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    total = {s["name"]: s for s in json.loads(out)["stages"]}["total"]
    assert total["summary"] == f"total = {3 * len('alphabravo!charlie')}"
    assert json.loads((toy.cache / "total" / total["key"] / "manifest.json").read_text())["result"]["data"] == \
        ["a.txt", "b.txt", "c.txt"]
    # the run is over: now its outputs are an anonymous experiment like any other
    assert len(json.loads(toy.cli("--json", "gc", "--experiments").stdout)["removed"]) == 2


def test_gc_of_an_unknown_dataset_is_an_error(toy):
    toy.run()
    proc = toy.cli("gc", "--dataset", "typo.yaml", check=2)
    assert proc.stderr.strip() == "pipeline: error: typo.yaml: dataset manifest not found"
    assert (toy.cache / "upper").is_dir() and len(list((toy.cache / "upper").iterdir())) == 1


def _lossless(path, upright, rotation: int, n: int = 40) -> None:
    """``upright`` frames stored turned so that turning them ``rotation`` degrees counter-clockwise (what the
    display matrix says) shows them upright."""
    import av
    import numpy as np

    out = av.open(str(path), "w")
    s = out.add_stream("libx264", rate=12, options={"qp": "0"})
    s.height, s.width = np.rot90(upright, -rotation // 90).shape[:2]
    s.pix_fmt = "yuv444p"
    if rotation:
        s.set_display_rotation(rotation)  # as a phone held sideways writes it
    for i in range(n):
        frame = upright.copy()
        frame[i % 20: i % 20 + 8, :8] = 255  # motion
        frame = np.ascontiguousarray(np.rot90(frame, -rotation // 90))
        for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()


def test_rotation_metadata_is_applied_like_a_player_and_recorded(toy, tmp_path):
    """The same upright picture, stored upright and stored turned with a display matrix, decodes to the
    same frames (PyAV turns it; decord, which mangles such files, declines them) and the same features;
    the per-video attrs say how it was stored."""
    import numpy as np

    from extractors.decoding import DecodeError, DecodeSpec, decode_video
    from pipeline.store import open_stage_store

    rng = np.random.default_rng(0)
    upright = rng.integers(0, 256, (96, 64, 3), dtype=np.uint8)  # portrait: 96 high, 64 wide
    videos = tmp_path / "rot"
    videos.mkdir()
    _lossless(videos / "up.mp4", upright, 0)
    for turn in (90, 180, 270):
        _lossless(videos / f"r{turn}.mp4", upright, turn)
    spec = DecodeSpec(fps=None, clip_len=16, frame_interval=1, stride=4, tail="drop", resize="short_side",
                      size=(64,), decoders=("pyav",))

    def frames(name, s=spec):
        events = list(decode_video(str(videos / name), s))
        return events[0][1], np.concatenate([e[2] for e in events if e[0] == "frames"])

    meta_up, ref = frames("up.mp4")
    for turn in (90, 180, 270):
        meta, got = frames(f"r{turn}.mp4")
        assert (meta.height, meta.width, meta.rotation) == (96, 64, turn)
        np.testing.assert_array_equal(got, ref)
    meta, got = frames("r90.mp4", DecodeSpec(**{**spec.__dict__, "decoders": ("decord", "pyav")}))
    assert meta.decoder == "pyav"
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(DecodeError, match="rotation"):
        frames("r90.mp4", DecodeSpec(**{**spec.__dict__, "decoders": ("decord",)}))

    manifest = toy.write("data/rot.yaml", f"name: rot\ntask: localize\nvideos: {videos}\n"
                                          "params: {extract: {preset: demo, dtype: float32}}\n")
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "--stages", str(root / "stages.yaml"),
                          "--cache-dir", str(toy.cache), "--json", "run", "extract", "--dataset", str(manifest),
                          "--set", "extract.decoders=[pyav]"], env=toy.env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    (stage,) = json.loads(run.stdout)["stages"]
    with open_stage_store(Path(stage["dir"])) as store:
        assert {v: store.video_attrs(v)["rotation"] for v in store.videos()} == \
            {"up": 0, "r90": 90, "r180": 180, "r270": 270}
        for v in ("r90", "r180", "r270"):  # same frames; batches mixing videos differently: float rounding
            np.testing.assert_allclose(store.read(v), store.read("up"), rtol=1e-5, atol=1e-6)
