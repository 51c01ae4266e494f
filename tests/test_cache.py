"""Stage keys, per-item records and reuse, through the real CLI on the toy graph (see conftest)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

# a+b+c = 5+6+7 characters
TOTAL = 18


def statuses(out: dict) -> dict[str, str]:
    return {name: s["status"] for name, s in out["by_stage"].items()}


def test_first_run_does_the_work_and_rerun_does_none(toy):
    first = toy.run()
    assert statuses(first) == {"upper": "ran", "total": "ran"}
    assert sorted(toy.work("upper")) == ["a", "b", "c"] and toy.work("total") == [str(TOTAL)]
    assert first["by_stage"]["total"]["summary"] == f"total = {TOTAL}"
    assert first["hashed"] >= 3

    again = toy.run()
    assert statuses(again) == {"upper": "cached", "total": "cached"}
    assert again["hashed"] == 0  # nothing unchanged is ever reopened
    assert again["by_stage"]["total"]["summary"] == f"total = {TOTAL}"  # shown when cached too
    assert sorted(toy.work("upper")) == ["a", "b", "c"] and toy.work("total") == [str(TOTAL)]
    assert {s["state"] for s in toy.status().values()} == {"done"}
    key_dir = toy.cache / "total" / first["by_stage"]["total"]["key"]
    assert (key_dir / "total.txt").read_text() == str(TOTAL)
    assert not list((toy.cache / "total").glob("*.partial"))


def test_human_output_prints_summaries(toy):
    proc = toy.cli("run", "all", "--dataset", "toy")
    assert "total = 18" in proc.stdout and "upper-cased 3 files" in proc.stdout
    proc = toy.cli("run", "total", "--dataset", "toy")
    assert "cached" in proc.stdout and "total = 18" in proc.stdout
    assert f"outputs: {toy.cache / 'total'}" in proc.stdout  # where to look, also when cached


def test_one_run_goes_through_a_chain_of_whole_stages(toy):
    toy.write("stages.yaml", (toy.root / "stages.yaml").read_text() + (
        "  report:\n    entry: toyreport:report\n    needs: [total]\n"))
    toy.write("toyreport.py", "def report(ctx):\n"
                              "    total = (ctx.upstream['total'] / 'total.txt').read_text()\n"
                              "    return {'summary': 'report of ' + total}\n")
    out = toy.run(stage="report")
    assert statuses(out) == {"upper": "ran", "total": "ran", "report": "ran"}
    assert out["by_stage"]["report"]["summary"] == f"report of {TOTAL}"
    assert statuses(toy.run(stage="report")) == {"upper": "cached", "total": "cached", "report": "cached"}


def test_param_change_reruns_that_stage_and_dependants_only(toy):
    toy.run()
    out = toy.run("--set", "total.scale=2")
    assert statuses(out) == {"upper": "cached", "total": "ran"}
    assert toy.work("total") == [str(TOTAL), str(2 * TOTAL)]

    out = toy.run("--set", "upper.repeat=2")
    assert statuses(out) == {"upper": "ran", "total": "ran"}
    assert sorted(toy.work("upper")) == ["a", "a", "b", "b", "c", "c"]

    # runtime values change how a stage runs, never its key
    out = toy.run("--set", "upper.delay=0.01")
    assert statuses(out) == {"upper": "cached", "total": "cached"}

    # back to the defaults: both outputs are still in the cache
    out = toy.run()
    assert statuses(out) == {"upper": "cached", "total": "cached"}
    status = toy.status("--set", "total.fmt.width=4")
    # a configuration that never ran is "not run" (not stale), with how it differs from the closest run
    assert status["upper"]["state"] == "done" and status["total"]["state"] == "not run"
    assert status["total"]["reasons"] == ["closest earlier run: param total.fmt.width: 0 -> 4"]


def test_touch_without_change_rehashes_once_and_reruns_nothing(toy):
    toy.run()
    st = os.stat(toy.videos / "b.mp4")
    os.utime(toy.videos / "b.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    out = toy.run()
    assert out["hashed"] == 1
    assert statuses(out) == {"upper": "cached", "total": "cached"}
    assert toy.run()["hashed"] == 0
    assert sorted(toy.work("upper")) == ["a", "b", "c"] and len(toy.work("total")) == 1


def test_changed_input_reprocesses_that_item_alone(toy):
    toy.run()
    toy.write("videos/b.mp4", "bravo, changed")
    status = toy.status()
    assert status["upper"]["state"] == "incomplete" and "b" in status["upper"]["reasons"][0]
    out = toy.run()
    assert out["by_stage"]["upper"]["items"] == {"total": 3, "done": 1, "skipped": 2, "failed": 0}
    assert sorted(toy.work("upper")) == ["a", "b", "b", "c"]
    assert toy.work("total") == [str(TOTAL), str(TOTAL - 6 + 14)]
    # a lost completion record means the item is not done, whatever the snapshot of records says
    (toy.cache / "upper" / out["by_stage"]["upper"]["key"] / "items" / "c.json").unlink()
    assert toy.run()["by_stage"]["upper"]["items"]["done"] == 1
    assert sorted(toy.work("upper")) == ["a", "b", "b", "c", "c"]


def test_added_item_is_processed_alone(toy):
    toy.run()
    toy.write("videos/d.webm", "delta")
    out = toy.run()
    assert out["by_stage"]["upper"]["items"] == {"total": 4, "done": 1, "skipped": 3, "failed": 0}
    assert sorted(toy.work("upper")) == ["a", "b", "c", "d"]
    assert toy.work("total")[-1] == str(TOTAL + 5)


def test_code_edit_makes_stage_stale_and_status_names_the_file(toy):
    toy.run()
    toy.write("toytotal/fmt.py", "def render(value, width):\n    return f'{value:>{width}}'  # same output\n")
    status = toy.status()
    assert status["upper"]["state"] == "done"
    assert status["total"]["state"] == "stale"
    assert status["total"]["reasons"] == ["code file changed: toytotal/fmt.py"]
    out = toy.run()
    assert statuses(out) == {"upper": "cached", "total": "ran"}


def test_an_edit_the_entry_cannot_reach_keeps_the_stage_done(toy):
    """A plot or CLI module of the same package is not code the stage runs: editing it retrains nothing."""
    toy.write("toytotal/plots.py", "def draw(value):\n    return value\n")
    first = toy.run()
    toy.write("toytotal/plots.py", "def draw(value):\n    return 2 * value  # another figure\n")
    assert toy.status()["total"]["state"] == "done"
    again = toy.run()
    assert statuses(again) == {"upper": "cached", "total": "cached"}
    assert again["by_stage"]["total"]["key"] == first["by_stage"]["total"]["key"]


def test_file_params_enter_the_key_by_content(toy):
    weights = toy.write("w1.pt", "weights v1")
    first = toy.run("--set", f"upper.weights={weights}", stage="upper")
    moved = toy.root / "ckpt" / "renamed.pt"
    moved.parent.mkdir()
    weights.rename(moved)
    same = toy.run("--set", f"upper.weights={moved}", stage="upper")
    assert same["by_stage"]["upper"]["status"] == "cached"
    assert same["by_stage"]["upper"]["key"] == first["by_stage"]["upper"]["key"]
    moved.write_text("weights v2")
    status = toy.status("--set", f"upper.weights={moved}")
    assert status["upper"]["state"] == "stale" and status["upper"]["reasons"] == ["file upper.weights changed"]
    assert toy.run("--set", f"upper.weights={moved}", stage="upper")["by_stage"]["upper"]["status"] == "ran"
    # a mapping of files (two-stream weights): each by content, named alone when it changes
    flow = toy.write("flow.pt", "flow v1")
    pair = f"upper.weights={{rgb: {moved}, flow: {flow}}}"
    toy.run("--set", pair, stage="upper")
    flow.write_text("flow v2")
    assert toy.status("--set", pair)["upper"]["reasons"] == ["file upper.weights.flow changed"]


def test_missing_file_of_a_downstream_stage_fails_before_any_work(toy):
    stages = toy.root / "stages.yaml"
    stages.write_text(stages.read_text().replace("    params: {scale: 1, fmt: {width: 0}}",
                                                 "    file_params: [table]\n    params: {scale: 1, fmt: {width: 0}, "
                                                 "table: null}"))
    proc = toy.cli("run", "total", "--dataset", str(toy.manifest), "--set", "total.table=missing.csv", check=2)
    assert proc.stderr.strip() == "pipeline: error: total.table: file not found: missing.csv"
    assert toy.work("upper") == []


def test_version_pinned_stage_reports_source_drift_but_stays_done(toy):
    toy.run()
    path = toy.root / "toyupper" / "__init__.py"
    path.write_text(path.read_text() + "\n# a comment does not throw away the outputs\n")
    status = toy.status()
    assert status["upper"]["state"] == "done"
    assert "toyupper/__init__.py" in status["upper"]["reasons"][0]
    assert "version 1 pinned" in status["upper"]["reasons"][0]
    toy.write("stages.yaml", (toy.root / "stages.yaml").read_text().replace("version: 1", "version: 2"))
    status = toy.status()
    assert status["upper"]["state"] == "stale" and status["upper"]["reasons"] == ["version 1 -> 2"]


def test_item_failures_are_listed_kept_and_retried(toy):
    out = toy.run("--set", "upper.fail=b", check=1)
    assert out["by_stage"]["upper"]["items"] == {"total": 3, "done": 2, "skipped": 0, "failed": 1}
    assert [f["id"] for f in out["by_stage"]["upper"]["failures"]] == ["b"]
    assert out["by_stage"]["total"]["status"] == "ran"  # keep going on the complete items
    assert sorted(toy.work("upper")) == ["a", "c"]
    out = toy.run()
    assert out["by_stage"]["upper"]["items"]["done"] == 1
    assert sorted(toy.work("upper")) == ["a", "b", "c"]
    out = toy.run("--set", "upper.fail=a", "--force", "--fail-fast", stage="upper", check=1)
    assert out["by_stage"]["upper"]["status"] == "failed"


def test_sigkill_mid_stage_leaves_nothing_done_and_rerun_finishes_the_rest(toy):
    for vid in "defgh":
        toy.write(f"videos/{vid}.mp4", vid * 3)
    proc = toy.popen("run", "total", "--dataset", "toy", "--set", f"upper.gate={toy.root / 'gate'}")
    deadline = time.time() + 20
    while len(toy.work("upper")) < 1 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # held mid-stage after its first item
    proc.wait()
    done_before = toy.work("upper")
    assert len(done_before) == 1
    status = toy.status()
    assert status["upper"]["state"] != "done" and status["total"]["state"] != "done"
    out = toy.run()
    processed = out["by_stage"]["upper"]["items"]
    assert processed["done"] == 8 - len(done_before) and processed["skipped"] == len(done_before)
    assert sorted(toy.work("upper")) == sorted("abcdefgh")  # every item exactly once over both runs
    assert {s["state"] for s in toy.status().values()} == {"done"}


def test_sigkill_in_whole_stage_keeps_partial_and_reports_not_done(toy):
    toy.write("toytotal/fmt.py", "import time\n\ndef render(value, width):\n    time.sleep(30)\n")
    toy.run(stage="upper")
    proc = toy.popen("run", "total", "--dataset", "toy")
    partial = None
    deadline = time.time() + 20
    while partial is None and time.time() < deadline:
        found = list((toy.cache / "total").glob("*.partial")) if (toy.cache / "total").exists() else []
        partial = found[0] if found else None
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = toy.status()
    assert status["total"]["state"] == "missing"
    assert "interrupted" in status["total"]["reasons"][0]
    assert partial.exists() and not (toy.cache / "total" / partial.name.removesuffix(".partial")).exists()


def test_gc_removes_what_no_current_key_refers_to(toy):
    current = toy.run()
    old = toy.run("--set", "total.scale=3")
    old_dir = toy.cache / "total" / old["by_stage"]["total"]["key"]
    # an anonymous experiment (a --set run) is kept, and gc says why; --experiments removes it
    proc = toy.cli("gc")
    assert f"keep {old_dir}: anonymous experiment (pipeline gc --experiments removes it)" in proc.stdout
    assert old_dir.exists()
    dry = toy.cli("gc", "--dry-run", "--experiments")
    assert f"would remove {old_dir}" in dry.stdout and old_dir.exists()
    proc = toy.cli("gc", "--experiments")
    assert "reclaimed" in proc.stdout and not old_dir.exists()
    for name in ("upper", "total"):
        assert (toy.cache / name / current["by_stage"][name]["key"]).exists()
    assert statuses(toy.run()) == {"upper": "cached", "total": "cached"}


def test_gc_keeps_outputs_of_a_dataset_whose_keys_cannot_be_computed(toy):
    toy.write("data/other.yaml", "name: other\nvideos: ${TOY_OTHER_VIDEOS}\n")
    toy.env["TOY_OTHER_VIDEOS"] = str(toy.videos)
    other = toy.cli("--json", "run", "total", "--dataset", "other")
    other_dir = toy.cache / "total" / json.loads(other.stdout)["stages"][1]["key"]
    del toy.env["TOY_OTHER_VIDEOS"]
    proc = toy.cli("gc")
    assert other_dir.exists() and "kept every output of dataset other" in proc.stderr


@pytest.mark.parametrize("what,stage,expected", [("train", "localize", "localize"),
                                                 ("eval", "localize", "localize_eval"),
                                                 ("extract", None, "extract")])
def test_run_verbs_resolve_to_stages(what, stage, expected):
    from pathlib import Path

    from pipeline.datasets import Dataset
    from pipeline.runner import targets_for
    from pipeline.stage_graph import load_stage_graph

    graph = load_stage_graph(Path(__file__).resolve().parent.parent / "stages.yaml")
    ds = Dataset(name="x", task="localize", path=Path("x.yaml"), root=Path("."), videos=None, annotations=None,
                 splits={}, params={})
    assert targets_for(graph, ds, what, stage) == [expected]
    assert targets_for(graph, ds, "all", None) == ["extract", "localize", "localize_eval"]
