"""``extract`` on local Dask and Ray clusters: the store and records equal the local run's, a worker killed
mid-task is retried without losing or duplicating a record, a killed driver's rerun does only what is
missing, GPU requests a cluster cannot meet are refused up front, a missing engine is one line, exit 2.

Each engine's tests skip (saying which package) only where that engine cannot be imported.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_decoding import make_video
from test_extract_digest import features_digest

ROOT = Path(__file__).resolve().parent.parent
N_VIDEOS = 5

def _needs(module: str, extra: str):
    try:
        __import__(module)
    except ImportError:
        return pytest.mark.skip(reason=f"{module} is not installed (pip install '.[{extra}]')")
    return lambda test: test


needs_dask, needs_ray = _needs("distributed", "dask"), _needs("ray", "ray")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale")
    (root / "videos").mkdir()
    for i in range(N_VIDEOS):
        make_video(root / "videos" / f"v{i}.mp4", n_frames=30 + 9 * i)
    manifest = root / "scale_demo.yaml"
    manifest.write_text(f"name: scale_demo\ntask: localize\nvideos: {root / 'videos'}\n"
                        "params:\n  extract: {preset: demo, size: 32, crop: [32, 32]}\n")
    return manifest


def _argv(cache: Path, manifest: Path, *extra: str) -> list[str]:
    # One clip per forward: which clips share a batch would otherwise move the last float bits.
    return [sys.executable, "-m", "pipeline", "--cache-dir", str(cache), "--json", "run", "extract",
            "--dataset", str(manifest), "--set", "extract.batch_size=1", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_NO_PROGRESS": "1", "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _run(cache: Path, manifest: Path, *extra: str, code: int = 0) -> dict:
    proc = subprocess.run(_argv(cache, manifest, *extra), cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=_env())
    assert proc.returncode == code, proc.stderr[-3000:]
    return json.loads(proc.stdout)["stages"][0] if proc.stdout else {"stderr": proc.stderr}


def _contents(stage_dir: Path) -> tuple[str, dict]:
    records = {p.name: json.loads(p.read_text()) for p in sorted((stage_dir / "items").glob("*.json"))}
    return features_digest(stage_dir), records


@pytest.fixture(scope="module")
def local(dataset, tmp_path_factory) -> tuple[str, dict]:
    stage = _run(tmp_path_factory.mktemp("local"), dataset, "--workers", "1")
    assert stage["items"]["done"] == N_VIDEOS
    return _contents(Path(stage["dir"]))


@needs_dask
def test_dask_cluster_store_equals_the_local_run(dataset, local, tmp_path):
    stage = _run(tmp_path / "cache", dataset, "--backend", "dask", "--workers", "2")
    assert stage["items"] == {"total": N_VIDEOS, "done": N_VIDEOS, "skipped": 0, "failed": 0}
    assert _contents(Path(stage["dir"])) == local
    again = _run(tmp_path / "cache", dataset, "--backend", "dask", "--workers", "2")
    assert again["status"] == "cached"


@needs_ray
def test_ray_cluster_store_equals_the_local_run(dataset, local, tmp_path, monkeypatch):
    # The address file a `ray start` cluster leaves behind (its `ray stop` removes it; a kill does not):
    # without --address the run starts a cluster of its own all the same.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    try:
        stage = _run(tmp_path / "cache", dataset, "--backend", "ray", "--workers", "2")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert stage["items"] == {"total": N_VIDEOS, "done": N_VIDEOS, "skipped": 0, "failed": 0}
    assert _contents(Path(stage["dir"])) == local


@needs_dask
def test_dask_driver_killed_mid_run_leaves_no_worker_and_the_rerun_does_only_the_rest(dataset, local, tmp_path):
    import psutil

    cache = tmp_path / "cache"
    proc = subprocess.Popen(_argv(cache, dataset, "--backend", "dask", "--workers", "2"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 120
    records: list[Path] = []
    while not records and time.monotonic() < deadline and proc.poll() is None:
        records = list(cache.glob("extract/*/items/*.json"))
        time.sleep(0.05)
    assert records and proc.poll() is None, "the run ended before a record was committed"
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"cluster processes outlived their driver: {alive}"
    committed = len(list(cache.glob("extract/*/items/*.json")))
    assert 1 <= committed < N_VIDEOS      # committed by the tasks themselves, as each finished
    stage = _run(cache, dataset, "--backend", "dask", "--workers", "2")
    assert stage["items"] == {"total": N_VIDEOS, "done": N_VIDEOS - committed, "skipped": committed, "failed": 0}
    assert _contents(Path(stage["dir"])) == local


def _killed_once_extraction(backend: str, dataset: Path, local, tmp_path: Path) -> None:
    """Each task's worker is SIGKILLed on its first run: before it writes anything (even videos) or
    after its data and records are written but before it reports (odd). The engine reruns it."""
    from extractors.stage import ExtractJob, _extract_group, extract
    from pipeline.context import Item, StageContext
    from pipeline.executors import stream

    stage_dir = tmp_path / "extract"
    items = [Item(p.stem, p, "") for p in sorted((dataset.parent / "videos").glob("*.mp4"))]
    params = {"preset": "demo", "size": 32, "crop": [32, 32]}
    ctx = StageContext(name="extract", key="k", params=params, runtime={"batch_size": 1}, dataset=None,
                       out_dir=stage_dir)
    extract(ctx)  # the store, made by the driver before any task
    job = ExtractJob(params, {"batch_size": 1}, stage_dir, 1, "cpu")
    marks = tmp_path / "marks"
    marks.mkdir()

    def dies_once(task):
        index = int(task[1][0].id[1:])
        first = not (marks / str(index)).exists()
        (marks / str(index)).touch()
        if first and index % 2 == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        result = _extract_group(task)
        if first:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    results = list(stream(dies_once, [(job, [item]) for item in items], backend=backend, workers=2))
    assert all(error is None for _, _, error in results), [str(e) for _, _, e in results if e]
    reported = sorted(item_id for _, (records, _), _ in results for item_id, _ in records)
    assert reported == [item.id for item in items]           # each once, none lost
    digest, records = _contents(stage_dir)
    want_digest, want_records = local
    assert digest == want_digest
    assert {name: {k: v for k, v in rec.items() if k != "source_fingerprint"} for name, rec in records.items()} == \
        {name: {k: v for k, v in rec.items() if k != "source_fingerprint"} for name, rec in want_records.items()}


@needs_dask
def test_dask_worker_killed_mid_task_is_retried_without_losing_or_duplicating(dataset, local, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _killed_once_extraction("dask", dataset, local, tmp_path)


@needs_ray
def test_ray_worker_killed_mid_task_is_retried_without_losing_or_duplicating(dataset, local, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _killed_once_extraction("ray", dataset, local, tmp_path)


@needs_dask
def test_gpu_requests_a_cluster_cannot_meet_are_refused_before_any_work(dataset, tmp_path):
    out = _run(tmp_path / "cache", dataset, "--backend", "dask", "--workers", "1", "--gpus-per-task", "1", code=2)
    assert "--gpus-per-task 1: no Dask worker declares that many GPUs" in out["stderr"]
    assert len(out["stderr"].strip().splitlines()) == 1
    assert not list((tmp_path / "cache").glob("extract/*/items/*.json"))
    out = _run(tmp_path / "cache", dataset, "--address", "tcp://127.0.0.1:1", code=2)
    assert "--address: only with --backend ray or dask" in out["stderr"]


@pytest.mark.parametrize("backend, module", [("ray", "ray"), ("dask", "distributed")])
def test_a_missing_engine_is_one_line_exit_2_before_any_work(dataset, tmp_path, backend, module):
    # The engine made unimportable in the CLI's own process, as where it was never installed.
    argv = _argv(tmp_path / "cache", dataset, "--backend", backend)
    code = f"import sys; sys.modules[{module!r}] = None; sys.argv[1:] = {argv[3:]!r}; import runpy; " \
           "runpy.run_module('pipeline', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"pipeline: error: --backend {backend}: {module} is not installed "
                                        f"(pip install 'video-feature-pipeline[{backend}]')"]
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("extract/*"))
