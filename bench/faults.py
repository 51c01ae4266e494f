"""Fault campaign: kills, gc beside running stages, a full disk and a seeded fuzzer, through the CLI.

- kills: ``pipeline run extract`` on a small generated dataset, its driver killed (SIGKILL or
  SIGTERM) at random moments or just after a record is written (mid-write), chained; decode workers
  killed under a live driver. After each kill no process of the run may remain, the next run must start
  at once (``--no-wait``: a stale lock fails it) and the records written before the kill must survive;
  the final store must equal an uninterrupted run's, video by video.
- engines: ``run extract`` on the local back-end, a local 2-worker Dask cluster and a local Ray, its
  driver SIGKILLed mid-run and an engine worker SIGKILLed mid-task in turn, chained, then a final run.
  No process of a killed driver's cluster may outlive it, a killed worker's task is rerun by the engine
  (the run exits 0), no record is lost or rewritten by a later run (it does only what is missing), no
  item fails, and the final store and records equal an uninterrupted local run's bit for bit.
- gc: ``pipeline gc`` in a loop beside ``run all`` on a manifest given by path (not a gc root); the run
  must succeed and every output it reports must exist afterwards.
- full disk: extraction into a size-limited tmpfs (mounted here when we may; skipped otherwise) must
  stop with one line naming the path and "no space left", exit 1, and finish once there is room.
- fuzz: seeded mutations of manifests, stages files, annotation JSONs and ``--set`` values; each
  command must end (no hang), without a traceback, with an allowed exit code; inputs known to be invalid
  must be refused (exit 2). Checks whose refusal is the parameter-validation work (``schema``) are
  counted apart, so they show what is pending without failing the core campaign.

    python bench/faults.py [--seed 0] [--kills 10] [--engine-kills 4] [--fuzz 60] [--work /tmp/faults_bench]
    python bench/faults.py --steps engines --engines dask,ray --engine-kills 2    # only some parts
    python bench/faults.py --bad-values bad.txt   # extra known-bad --set values, one per line

Prints the counts: kills survived (per engine too), records lost (0), videos redone by a rerun (0),
items failed (0), hangs (0), tracebacks (0), wrong exit codes (0), invalid values accepted (0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages.yaml"

MINI = """\
name: {name}
task: localize
generate:
  seed: 1
  train_videos: {train}
  test_videos: {test}
  duration_s: [8, 14]
  fps: 12
  size: 64
  classes: [sweep, pulse, spin, blink]
  instances: [1, 2]
  action_s: [2, 4]
splits: {{train: train, test: test}}
params:
  extract: {{preset: demo}}
  localize: {{preset: demo, epochs: 2, batch_size: 2, threads: 1}}
"""

# --set values the issue found accepted; all are the schema work's to refuse (exit 2, before any work).
SCHEMA_BAD_SETS = [
    "localize.epochs=x", "localize.epochs=1.5", "localize.epochs=true", "localize.epochs=1000000000",
    "localize.lr=.inf", "localize.seed=-1", "localize.threads=0", "localize.threads=-1",
    "localize.device=tpu", "localize.device=gpu", "localize_eval.nms_sigma=0", "localize_eval.nms_sigma=-1",
    "localize_eval.nms_sigma=.nan", "localize_eval.min_score=2", "localize_eval.min_score=-1",
    "localize_eval.tious=[]", "localize_eval.iou_threshold=x", "extract.fps=.nan", "extract.batch_size=0",
    "extract.video_timeout_s=0", "extract.decoders=[]", "extract.offset_frames=-1000",
    "extract.clip_len=100000", "extract.decoders=[ffmpeg]",  # runtime of a cached stage: ignored today
]
# Refused by the core already (unknown stage or param, malformed --set).
CORE_BAD_SETS = ["extract.nope=1", "nostage.x=1", "extract=1", "extract.=1", ".x=1", "extract.preset=nope",
                 "extract.store=parquet", "extract.dtype=int8"]


KILL_MODES = ("driver-9", "driver-term", "mid-write", "worker")
STEPS = ("kills", "engines", "gc", "disk", "fuzz")


class Campaign:
    def __init__(self, work: Path, seed: int, log=print):
        self.work = work
        self.rng = random.Random(seed)
        self.log = log
        self.counts: Counter = Counter()
        self.notes: list[str] = []
        work.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PIPELINE_NO_PROGRESS="1",
                        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        self.env.pop("PIPELINE_CACHE", None)

    # -- plumbing -------------------------------------------------------------------------------
    def argv(self, cache: Path, *args: str, stages: Path = STAGES) -> list[str]:
        return [sys.executable, "-m", "pipeline.cli", "--stages", str(stages), "--cache-dir", str(cache), *args]

    def cli(self, cache: Path, *args: str, timeout: float = 120, allowed=(0,), stages: Path = STAGES,
            what: str = "", env: dict | None = None) -> subprocess.CompletedProcess | None:
        """Run one command; count a hang, a traceback or an exit code outside ``allowed``."""
        try:
            proc = subprocess.run(self.argv(cache, *args, stages=stages), cwd=self.work, env=env or self.env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fault("hangs", f"{what or args}: no answer in {timeout:g} s")
            self.reap(cache)
            return None
        self.judge(proc.returncode, proc.stderr, allowed, what or " ".join(args))
        return proc

    def generate(self, cache: Path, manifest: Path) -> None:
        """Only the demo generator of a manifest: the kills and the full disk aim at extraction."""
        code = ("import sys; from pathlib import Path; from pipeline.datasets import ensure_generated, load_dataset; "
                "c = Path(sys.argv[2]); ensure_generated(load_dataset(sys.argv[1], Path(sys.argv[3]), c), c)")
        subprocess.run([sys.executable, "-c", code, str(manifest), str(cache), str(ROOT)], cwd=self.work,
                       env=self.env, check=True, capture_output=True)

    def judge(self, code: int, stderr: str, allowed, what: str) -> None:
        if "Traceback" in stderr:
            self.fault("tracebacks", f"{what}: {stderr.strip().splitlines()[-1]}")
        if code not in allowed:
            self.fault("wrong exit codes", f"{what}: exit {code} (allowed {allowed}): {stderr.strip()[-300:]}")

    def fault(self, kind: str, note: str, n: int = 1) -> None:
        self.counts[kind] += n
        self.notes.append(f"{kind}: {note}")
        self.log(f"  FAULT {kind}: {note}")

    def processes(self, cache: Path) -> list[int]:
        """Live processes (not zombies) whose command line names ``cache``: runs and their workers."""
        pids, tag = [], str(cache).encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if tag in (d / "cmdline").read_bytes() and (d / "stat").read_text().split(") ")[1][0] != "Z":
                    pids.append(int(d.name))
            except (OSError, IndexError):
                pass
        return pids

    def reap(self, cache: Path) -> None:
        for pid in self.processes(cache):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def mini(self, name: str, train: int = 5, test: int = 2) -> Path:
        path = self.work / "manifests" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(MINI.format(name=name, train=train, test=test))
        return path

    @staticmethod
    def records(cache: Path) -> dict[str, str]:
        """id -> source fingerprint of every completion record of every extract key in ``cache``."""
        out = {}
        for p in cache.glob("extract/*/items/*.json"):
            try:
                out[p.stem] = json.loads(p.read_text())["source_fingerprint"]
            except (OSError, ValueError, KeyError):
                pass
        return out

    # -- kills ----------------------------------------------------------------------------------
    def kills(self, n: int, reference: bool = True, videos: tuple[int, int] = (6, 3),
              modes: tuple[str, ...] = ()) -> None:
        """``n`` chained runs, each killed (``modes`` in turn, else a random one), then a final run."""
        cache = self.work / "kills"
        shutil.rmtree(cache, ignore_errors=True)
        manifest = self.mini("kills", *videos)
        args = ("run", "extract", "--dataset", str(manifest), "--workers", "2")
        # generate the videos first: the kills are aimed at extraction
        self.generate(cache, manifest)
        kept: dict[str, str] = {}
        n_videos = len(list(cache.glob("datasets/kills-*/*/videos/*.mp4")))
        for trial in range(n):
            if len(self.records(cache)) == n_videos:  # the last run finished: kill the next from scratch
                shutil.rmtree(cache / "extract", ignore_errors=True)
                kept = {}
            mode = modes[trial % len(modes)] if modes else self.rng.choice(KILL_MODES)
            proc = subprocess.Popen(self.argv(cache, *args, "--no-wait"), cwd=self.work, env=self.env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            fired = self._fire(proc, cache, mode)
            try:
                out, err = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                self.fault("hangs", f"kill trial {trial} ({mode}): the run did not end")
                self.reap(cache)
                out, err = proc.communicate()
            if "is being run by" in err:
                self.fault("wrong exit codes", f"kill trial {trial}: stale lock: {err.strip()}")
            elif "Traceback" in err:
                self.fault("tracebacks", f"kill trial {trial} ({mode}): {err.strip().splitlines()[-1]}")
            deadline = time.time() + 5
            while self.processes(cache) and time.time() < deadline:
                time.sleep(0.05)
            orphans = self.processes(cache)
            if orphans:
                self.fault("hangs", f"kill trial {trial} ({mode}): {len(orphans)} process(es) outlived the run")
                self.reap(cache)
            now = self.records(cache)
            lost = [vid for vid, fp in kept.items() if now.get(vid) != fp]
            if lost:
                self.fault("records lost", f"kill trial {trial} ({mode}): {', '.join(lost)}", len(lost))
            kept.update(now)
            if fired:
                self.counts["kills survived"] += 1
            self.log(f"  kill {trial}: {mode:<11} {'fired' if fired else 'not fired (the run ended first)'}, "
                     f"{len(kept)} records so far")
        t0 = time.time()
        self.cli(cache, *args, "--no-wait", allowed=(0,), what="run after the kills")
        now = self.records(cache)
        lost = [vid for vid, fp in kept.items() if now.get(vid) != fp]
        if lost:
            self.fault("records lost", f"after the kills: {', '.join(lost)}", len(lost))
        self.log(f"  final run after {n} kills: {time.time() - t0:.1f} s")
        self.cli(cache, "verify", allowed=(0,), what="verify after the kills")
        if reference:
            self._compare_with_uninterrupted(cache, manifest)

    def _fire(self, proc: subprocess.Popen, cache: Path, mode: str) -> bool:
        """Kill the driver or a worker of ``proc`` at a random moment; False when it ended first."""
        if mode == "mid-write":
            before = len(list(cache.glob("extract/*/items/*.json")))
            target = before + self.rng.randint(1, 3)
            deadline = time.time() + 30
            while proc.poll() is None and time.time() < deadline:
                if len(list(cache.glob("extract/*/items/*.json"))) >= target:
                    break
                time.sleep(0.005)
        elif mode != "worker":
            time.sleep(self.rng.uniform(0.2, 1.5))
        if proc.poll() is not None:
            return False
        if mode == "worker":  # one of the decode processes, once they are up
            deadline = time.time() + 30
            while proc.poll() is None and not _children(proc.pid) and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(self.rng.uniform(0.0, 0.5))
            children = _children(proc.pid)
            if proc.poll() is not None or not children:
                return False
            os.kill(self.rng.choice(children), signal.SIGKILL)
            return True
        os.kill(proc.pid, signal.SIGTERM if mode == "driver-term" else signal.SIGKILL)
        return True

    def _compare_with_uninterrupted(self, cache: Path, manifest: Path) -> None:
        import numpy as np

        from pipeline.store import open_stage_store

        ref = self.work / "reference"
        shutil.rmtree(ref, ignore_errors=True)
        shutil.copytree(cache / "datasets", ref / "datasets")
        self.cli(ref, "run", "extract", "--dataset", str(manifest), "--workers", "2", what="uninterrupted run")
        (a,), (b,) = list(cache.glob("extract/*/manifest.json")), list(ref.glob("extract/*/manifest.json"))
        with open_stage_store(a.parent) as sa, open_stage_store(b.parent) as sb:
            gone = sorted(set(sb.videos()) - set(sa.videos()))
            if gone:
                self.fault("records lost", f"not in the store after the kills: {', '.join(gone)}", len(gone))
            differ = [v for v in sb.videos() if v in sa.videos()
                      and not np.array_equal(sa.read(v, raw=True), sb.read(v, raw=True))]
        self.counts["videos differing from an uninterrupted run"] += len(differ)

    # -- engine kills -----------------------------------------------------------------------------
    def engine_kills(self, backends: tuple[str, ...], n: int, videos: tuple[int, int] = (4, 2)) -> None:
        """Per back-end (local processes, a local 2-worker Dask cluster, a local Ray of 2 CPUs): ``n``
        chained ``run extract`` runs, the driver SIGKILLed mid-run (after a random number of records) and
        an engine worker SIGKILLed mid-task (its decode process running) in turn, then a final run.

        A killed driver must leave no process of its cluster; a killed worker's task must be run again by
        the engine (the run exits 0, nothing failed); no record committed before may be lost or rewritten
        by a later run (the rerun does only what is missing); the final store and records must equal an
        uninterrupted local run's bit for bit (one clip per forward, as tests/test_scale.py: which clips
        share a batch moves the last bits)."""
        import psutil

        manifest = self.mini("engines", *videos)
        source = self.work / "engines-videos"
        shutil.rmtree(source, ignore_errors=True)
        self.generate(source, manifest)
        n_videos = len(list(source.glob("datasets/engines-*/*/videos/*.mp4")))
        args = ("--json", "run", "extract", "--dataset", str(manifest), "--workers", "2", "--no-wait",
                "--set", "extract.batch_size=1")
        ref = self.work / "engines-reference"
        shutil.rmtree(ref, ignore_errors=True)
        shutil.copytree(source / "datasets", ref / "datasets")
        self.cli(ref, *args, timeout=600, what="uninterrupted local run")
        env = dict(self.env, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
        for backend in backends:
            t0 = time.time()
            cache = self.work / f"engines-{backend}"
            shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(source / "datasets", cache / "datasets")
            run = (*args, "--backend", backend) if backend != "local" else args
            fired_modes: Counter = Counter()
            for trial in range(n):
                mode = ("driver", "worker")[trial % 2]
                if len(self.records(cache)) == n_videos:  # the last run finished: kill the next from scratch
                    shutil.rmtree(cache / "extract", ignore_errors=True)
                before = _record_files(cache)
                proc = subprocess.Popen(self.argv(cache, *run), cwd=self.work, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                tree, fired = self._fire_engine(proc, cache, mode, backend, len(before), n_videos)
                try:
                    out, err = proc.communicate(timeout=300)
                except subprocess.TimeoutExpired:
                    self.fault("hangs", f"{backend} trial {trial} ({mode}): the run did not end")
                    proc.kill()
                    out, err = proc.communicate()
                what = f"{backend} {mode} kill {trial}"
                if "Traceback" in err:
                    self.fault("tracebacks", f"{what}: {err.strip().splitlines()[-1]}")
                if mode == "worker" or not fired:  # the engine (or the local pool) reran the task
                    self._judge_report(proc.returncode, out, err, what, n_videos, len(before))
                ended = time.time()
                _, alive = psutil.wait_procs(tree, timeout=10)
                if alive:  # how long the cluster's processes take to notice their driver is gone
                    # (Ray's dashboard and runtime-env agents: about 60 s, trying the dead GCS first)
                    names = sorted({_name(q) for q in alive})
                    _, alive = psutil.wait_procs(alive, timeout=110)
                    self.counts["runs whose processes outlived them by 10 s (not 120 s)"] += not alive
                    self.notes.append(f"{what}: {', '.join(names)} still alive 10 s after the run ended; "
                                      + (f"{len(alive)} after 120 s" if alive else
                                         f"all gone {time.time() - ended:.0f} s after it"))
                    self.log(f"    {self.notes[-1]}")
                if alive:
                    self.fault("hangs", f"{what}: {len(alive)} process(es) outlived the run by 120 s")
                    for q in alive:
                        q.kill()
                self._judge_records(cache, before, what)
                fired_modes[mode] += fired
                self.counts[f"engine kills survived ({backend})"] += fired
                self.log(f"  {backend} kill {trial}: {mode:<6} {'fired' if fired else 'not fired (the run ended first)'}"
                         f", {len(self.records(cache))}/{n_videos} records")
            before = _record_files(cache)
            proc = self.cli(cache, *run, timeout=600, env=env, what=f"{backend}: run after the kills")
            if proc is not None:
                self._judge_report(proc.returncode, proc.stdout, proc.stderr, f"{backend} final run", n_videos,
                                   len(before))
            self._judge_records(cache, before, f"{backend} final run")
            differ = self._store_differs(cache, ref)
            self.counts["videos differing from an uninterrupted run"] += len(differ)
            if differ:
                self.notes.append(f"{backend}: differ from the uninterrupted run: {', '.join(differ)}")
            self.log(f"  {backend}: {n} runs killed ({dict(fired_modes)} fired), final run did "
                     f"{n_videos - len(before)} of {n_videos}, {len(differ)} videos differ from the uninterrupted "
                     f"run, {time.time() - t0:.0f} s")

    def _fire_engine(self, proc: subprocess.Popen, cache: Path, mode: str, backend: str, have: int,
                     n_videos: int) -> tuple[list, bool]:
        """SIGKILL ``proc``'s driver after a random number of new records, or one of its engine's workers
        while it runs a task; the driver's process tree just before, and whether it fired."""
        import psutil

        driver = psutil.Process(proc.pid)
        deadline = time.time() + 240
        if mode == "driver":
            target = have + self.rng.randint(1, max(1, n_videos - have - 1))
            while proc.poll() is None and time.time() < deadline and len(self.records(cache)) < target:
                time.sleep(0.01)
            time.sleep(self.rng.uniform(0.0, 0.3))
            victim = driver
        else:
            victim = None
            while proc.poll() is None and time.time() < deadline and victim is None:
                busy = _busy_workers(driver, backend)
                victim = self.rng.choice(busy) if busy else None
                time.sleep(0.02)
            time.sleep(self.rng.uniform(0.0, 0.3))
        try:
            tree = driver.children(recursive=True)
        except psutil.Error:
            return [], False
        if proc.poll() is not None or victim is None:
            return tree, False
        try:
            victim.kill()
        except psutil.Error:
            return tree, False
        return tree, True

    def _judge_report(self, code: int, out: str, err: str, what: str, n_videos: int, had: int) -> None:
        """A run that must have finished: exit 0, every video done or skipped, none failed, and the
        videos done exactly the ones without a record before it."""
        if code != 0:
            self.fault("wrong exit codes", f"{what}: exit {code}: {err.strip()[-300:]}")
            return
        items = json.loads(out)["stages"][0]["items"]
        want = {"total": n_videos, "done": n_videos - had, "skipped": had, "failed": 0}
        if items != want:
            self.fault("wrong exit codes", f"{what}: items {items}, expected {want}")

    def _judge_records(self, cache: Path, before: dict, what: str) -> None:
        now = _record_files(cache)
        lost = sorted(vid for vid in before if vid not in now or now[vid][0] != before[vid][0])
        if lost:
            self.fault("records lost", f"{what}: {', '.join(lost)}", len(lost))
        redone = sorted(vid for vid in before if vid in now and now[vid][1] != before[vid][1])
        if redone:
            self.fault("videos redone by a rerun", f"{what}: {', '.join(redone)}", len(redone))
        failed = sum(1 for f in cache.glob("extract/*/failures.jsonl") for line in f.read_text().splitlines()
                     if line.strip())
        if failed:
            self.fault("items failed", f"{what}: {failed} line(s) in failures.jsonl", failed)
            for f in cache.glob("extract/*/failures.jsonl"):
                f.unlink()

    def _store_differs(self, cache: Path, ref: Path) -> list[str]:
        """Videos whose features (stored values and dtype) or record differ between two caches' stores, or
        that one lacks. A local decode process killed under decord is taken for decord's crash (decord #25)
        and its video decoded again by PyAV: the same frames, so the same features, but the record names
        PyAV and its fps reading; counted apart."""
        import numpy as np

        from pipeline.store import open_stage_store

        (a,), (b,) = list(cache.glob("extract/*/manifest.json")), list(ref.glob("extract/*/manifest.json"))
        ra, rb = ({p.stem: json.loads(p.read_text()) for p in d.parent.glob("items/*.json")} for d in (a, b))
        by_decoder = ("decoder", "fps", "native_fps")
        differ = []
        with open_stage_store(a.parent) as sa, open_stage_store(b.parent) as sb:
            for v in sorted(set(sa.videos()) | set(sb.videos())):
                if v not in sa.videos() or v not in sb.videos() or v not in ra or v not in rb:
                    differ.append(v)
                    continue
                x, y = sa.read(v, raw=True), sb.read(v, raw=True)
                if x.dtype != y.dtype or not np.array_equal(x, y):
                    differ.append(v)
                elif ra[v] != rb[v]:
                    rest = [{k: r[k] for k in r if k not in by_decoder} for r in (ra[v], rb[v])]
                    if ra[v]["decoder"] != rb[v]["decoder"] and rest[0] == rest[1]:
                        self.counts["videos decoded again by PyAV after a kill (same features)"] += 1
                    else:
                        differ.append(v)
        return differ

    # -- gc beside a run --------------------------------------------------------------------------
    def gc_beside_run(self, rounds: int = 1) -> None:
        cache = self.work / "gc"
        manifest = self.mini("gcmini", train=4, test=2)
        for r in range(rounds):
            shutil.rmtree(cache / "extract", ignore_errors=True)
            shutil.rmtree(cache / "localize", ignore_errors=True)
            shutil.rmtree(cache / "localize_eval", ignore_errors=True)
            # unbuffered: the report line arrives when the run prints it, while it still holds its keys
            run = subprocess.Popen(self.argv(cache, "--json", "run", "all", "--dataset", str(manifest)),
                                   cwd=self.work, env=dict(self.env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            report: list[str] = []
            reader = threading.Thread(target=lambda: report.append(run.stdout.readline()), daemon=True)
            reader.start()
            sweeps, removed_live, held = 0, set(), 0
            while reader.is_alive():
                proc = self.cli(cache, "--json", "gc", allowed=(0,), what="gc beside run all")
                if proc is not None and proc.returncode == 0 and reader.is_alive():
                    # this gc ended before the run reported: what it removed was removed under the run
                    res = json.loads(proc.stdout)
                    removed_live.update(res["removed"])
                    held += len(res["held"])
                sweeps += 1
            out, err = run.communicate()
            out = report[0] + out
            self.judge(run.returncode, err, (0,), "run all beside gc")
            outputs = {s["dir"] for s in json.loads(out)["stages"] if s.get("dir")} if run.returncode == 0 else set()
            lost = sorted(outputs & removed_live)
            if lost:
                self.fault("records lost", f"gc deleted {', '.join(lost)} under the run", len(lost))
            self.log(f"  gc round {r}: {sweeps} sweeps beside run all ({held} held entries skipped), "
                     f"exit {run.returncode}, outputs deleted under the run: {len(lost)}")


    # -- full disk --------------------------------------------------------------------------------
    def full_disk(self) -> None:
        mnt = self.work / "full"
        mnt.mkdir(exist_ok=True)
        src = self.mini("diskmini", train=5, test=2)
        gen = self.work / "diskgen"
        self.generate(gen, src)
        videos = next(gen.glob("datasets/diskmini-*/*/videos"))
        manifest = self.work / "manifests" / "disk.yaml"
        manifest.write_text(f"name: disk\ntask: localize\nvideos: {videos}\nparams: {{extract: {{preset: demo}}}}\n")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            self.log("  full disk: skipped (cannot mount a tmpfs here: not root, or no mount namespace)")
            return
        try:
            cache = mnt / "cache"
            proc = self.cli(cache, "run", "extract", "--dataset", str(manifest), allowed=(1,), what="full disk")
            if proc is not None:
                last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
                if "no space left on device" not in last or not last.startswith(f"pipeline: error: {mnt}"):
                    self.fault("wrong exit codes", f"full disk: not a one-line 'no space' error: {last}")
                self.log(f"  full disk: exit {proc.returncode}: {last}")
            subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
            self.cli(cache, "run", "extract", "--dataset", str(manifest), allowed=(0,), what="after the disk grew")
            self.cli(cache, "verify", allowed=(0,), what="verify after the full disk")
            self.counts["full disks survived"] += 1
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)

    # -- fuzzer -----------------------------------------------------------------------------------
    def fuzz(self, n: int, bad_sets: list[str] = (), sets: tuple[str, ...] = ("core", "schema"),
             kinds: tuple[str, ...] = ("manifest", "stages", "annotations")) -> None:
        """``n`` random manifests, stages files and annotation files (``kinds``), then the known-bad --set
        values of ``sets`` (core: refused by the core; schema: the parameter validation's)."""
        cache = self.work / "fuzz"
        base = self.mini("fuzzmini", train=3, test=2)
        from pipeline.datasets import ensure_generated, load_dataset

        generated = ensure_generated(load_dataset(base, ROOT, cache), cache)
        videos, ann = generated.videos, generated.annotations
        cases = [(self.rng.choice(kinds), None) for _ in range(n)]
        if "core" in sets:
            cases += [("set-core", v) for v in CORE_BAD_SETS]
        if "schema" in sets:
            cases += [("set-schema", v) for v in SCHEMA_BAD_SETS + list(bad_sets)]
        for i, (kind, value) in enumerate(cases):
            d = self.work / "fuzzcase"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            if kind.startswith("set-"):
                self._expect_refusal(cache, kind, ("run", "all", "--dataset", str(base), "--set", value),
                                     f"--set {value}")
            elif kind == "manifest":
                text, invalid = _fuzz_manifest(self.rng, videos, ann)
                (d / "m.yaml").write_text(text)
                args = ("status", "--dataset", str(d / "m.yaml"))
                if invalid:
                    self._expect_refusal(cache, "manifest", args, f"manifest {text!r}")
                else:
                    self.cli(cache, *args, allowed=(0, 2), timeout=60, what=f"manifest {text!r}")
            elif kind == "stages":
                text, invalid = _fuzz_stages(self.rng, STAGES.read_text())
                (d / "stages.yaml").write_text(text)
                args = ("status", "--dataset", str(base))
                if invalid:
                    self._expect_refusal(cache, "stages", args, "stages file", stages=d / "stages.yaml")
                else:
                    self.cli(cache, *args, allowed=(0, 2), timeout=60, stages=d / "stages.yaml",
                             what="stages file")
            else:
                text, owner = _fuzz_annotations(self.rng, ann.read_text())
                (d / "ann.json").write_text(text)
                (d / "m.yaml").write_text(f"name: fuzzann\ntask: localize\nvideos: {videos}\nannotations: ann.json\n"
                                          "splits: {train: train, test: test}\n"
                                          "params: {extract: {preset: demo}, localize: {preset: demo, epochs: 1, "
                                          "batch_size: 2, threads: 1}}\n")
                args = ("run", "localize", "--dataset", str(d / "m.yaml"))
                if owner:
                    self._expect_refusal(cache, f"annotations-{owner}", args, f"annotations ({text[:80]!r})")
                else:
                    self.cli(cache, *args, allowed=(0, 1, 2), timeout=120, what="annotations")
            self.counts["fuzzed inputs"] += 1
            if i % 10 == 9:
                self.log(f"  fuzz: {i + 1} inputs")

    def _expect_refusal(self, cache: Path, kind: str, args, what: str, stages: Path = STAGES) -> None:
        """An invalid input: exit 2, one line, before any work. A refusal the schema work owns is counted
        apart (``invalid values accepted (schema)``)."""
        owner = "schema" if kind.endswith("schema") else "core"
        try:
            proc = subprocess.run(self.argv(cache, *args, stages=stages), cwd=self.work, env=self.env,
                                  capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:  # it was accepted and is working
            self.reap(cache)
            proc = None
        if proc is not None and "Traceback" in proc.stderr:
            self.fault("tracebacks", f"{what}: {proc.stderr.strip().splitlines()[-1]}")
        if proc is None or proc.returncode != 2:
            label = "invalid values accepted" + (" (schema)" if owner == "schema" else "")
            if owner == "schema":
                self.counts[label] += 1
                self.notes.append(f"{label}: {what}: exit {proc.returncode if proc else 'none (still working)'}")
            else:
                self.fault(label, f"{what}: exit {proc.returncode if proc else 'none (still working)'}")
        elif len(proc.stderr.strip().splitlines()) != 1:
            self.fault("wrong exit codes", f"{what}: refused, but not in one line: {proc.stderr.strip()[:300]}")

    def report(self) -> str:
        keys = ["kills survived", *sorted(k for k in self.counts if k.startswith("engine kills survived")),
                "full disks survived", "fuzzed inputs", "records lost", "videos redone by a rerun", "items failed",
                "videos differing from an uninterrupted run",
                "videos decoded again by PyAV after a kill (same features)",
                "runs whose processes outlived them by 10 s (not 120 s)", "hangs", "tracebacks", "wrong exit codes",
                "invalid values accepted", "invalid values accepted (schema)"]
        return "\n".join(f"{k:<58} {self.counts.get(k, 0)}" for k in keys)


def _record_files(cache: Path) -> dict[str, tuple[str, int]]:
    """id -> (source fingerprint, mtime in ns) of every completion record of the extract keys in ``cache``."""
    out = {}
    for p in cache.glob("extract/*/items/*.json"):
        try:
            out[p.stem] = (json.loads(p.read_text())["source_fingerprint"], p.stat().st_mtime_ns)
        except (OSError, ValueError, KeyError):
            pass
    return out


def _name(proc) -> str:
    import psutil

    try:
        return (proc.cmdline() or [proc.name()])[0].rsplit("/", 1)[-1]
    except psutil.Error:  # gone meanwhile
        return "?"


def _busy_workers(driver, backend: str) -> list:
    """The processes of ``driver``'s run that run a task now, each with its decode process started: the
    local back-end's decode workers; a Dask worker (the driver's child) with a child; a Ray worker (the
    raylet's child, titled ``ray::<task>``) with a child."""
    import psutil

    try:
        if backend == "local":
            return driver.children()
        if backend == "dask":
            return [p for p in driver.children() if p.children()]
        return [p for p in driver.children(recursive=True)
                if p.cmdline()[:1] == ["ray::_extract_group"] and p.parent().name() == "raylet" and p.children()]
    except psutil.Error:
        return []


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _scalar(rng: random.Random):
    return rng.choice([None, "", "x", -1, 0, 1.5, True, [], {}, "../nope", "\u00e9\u00e8", "a" * 300,
                       float("nan"), 10 ** 12, "${UNSET_FAULTS_VAR}"])


def _yaml(value) -> str:
    return json.dumps(value) if not isinstance(value, float) or value == value else ".nan"


def _fuzz_manifest(rng: random.Random, videos: Path, ann: Path) -> tuple[str, bool]:
    """A manifest text and whether it is certainly invalid (must be refused with exit 2)."""
    fields = {"name": "fz", "task": "localize", "videos": str(videos), "annotations": str(ann),
              "splits": {"train": "train", "test": "test"}, "params": {"extract": {"preset": "demo"}}}
    op = rng.choice(["drop", "type", "unknown", "badname", "badtask", "params-stage", "garbage"])
    invalid = op in ("unknown", "badname", "badtask", "params-stage", "garbage")
    if op == "drop":
        fields.pop(rng.choice(list(fields)))
    elif op == "type":
        k = rng.choice(list(fields))
        fields[k] = _scalar(rng)
    elif op == "unknown":
        fields["vidoes"] = str(videos)
    elif op == "badname":
        fields["name"] = rng.choice(["a b", "x/y", "", "é"])
    elif op == "badtask":
        fields["task"] = rng.choice(["segment", "", "LOCALIZE"])
    elif op == "params-stage":
        fields["params"] = {"extrakt": {}}
    if op == "garbage":
        return rng.choice(["{", "- a\n- b\n", ":\n  :", "\x00\x01", "name: [unclosed"]), True
    return "\n".join(f"{k}: {_yaml(v)}" for k, v in fields.items()) + "\n", invalid


def _fuzz_stages(rng: random.Random, text: str) -> tuple[str, bool]:
    op = rng.choice(["unknown-field", "cycle", "bad-need", "bad-entry", "truncate", "type"])
    if op == "unknown-field":
        return text.replace("    per_item: true", "    per_item: true\n    colour: red", 1), True
    if op == "cycle":
        return text.replace("    per_item: true", "    needs: [localize_eval]\n    per_item: true", 1), True
    if op == "bad-need":
        return text.replace("needs: [extract]", "needs: [extrakt]", 1), True
    if op == "bad-entry":
        return text.replace("extractors.stage:extract", "extractors.stage:nope", 1), False  # fails when run
    if op == "truncate":
        return text[:rng.randint(0, len(text))], False  # may still be valid YAML
    return text.replace("per_item: true", f"per_item: {_yaml(_scalar(rng))}", 1), False


def _fuzz_annotations(rng: random.Random, text: str) -> tuple[str, str | None]:
    """Annotation JSON text and who must refuse it: "core", "schema" or None (may be fine)."""
    data = json.loads(text)
    db = data.get("database", data)
    vid = rng.choice(sorted(db))
    op = rng.choice(["truncate", "not-json", "negative", "reversed", "label", "after-end", "duplicate",
                     "drop-db"])
    if op == "truncate":
        return text[:rng.randint(1, len(text) - 1)], "core"
    if op == "not-json":
        return "[1, 2, 3]", "core"
    segs = db[vid].get("annotations") or []
    if op in ("negative", "reversed", "label") and segs:
        s = segs[0]
        if op == "negative":
            s["segment"] = [-5.0, -1.0]
        elif op == "reversed":
            s["segment"] = list(reversed(s["segment"]))
        else:
            s["label"] = 12345
        return json.dumps(data), "core"
    if op == "after-end" and segs:
        # kept by design (pipeline.annotations.load_temporal: the official THUMOS14 ground truth has such
        # segments and its evaluator counts them); training clips them
        segs[0]["segment"] = [db[vid]["duration"] + 10, db[vid]["duration"] + 20]
        return json.dumps(data), None
    if op == "duplicate":
        body = json.dumps(data)
        entry = json.dumps({vid: db[vid]})[1:-1]
        return body.replace('"database": {', '"database": {' + entry + ", ", 1), "core"
    if op == "drop-db":
        return json.dumps({"version": "x"}), "core"
    return json.dumps(data), None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--gc-rounds", type=int, default=1)
    p.add_argument("--fuzz", type=int, default=60)
    p.add_argument("--work", type=Path, default=Path("/tmp/faults_bench"))
    p.add_argument("--engine-kills", type=int, default=4, help="killed runs per back-end (driver, worker in turn)")
    p.add_argument("--engines", default="local,dask,ray", help="back-ends of the engine kills, comma-separated")
    p.add_argument("--steps", default=",".join(STEPS), help=f"the parts to run, comma-separated: {', '.join(STEPS)}")
    p.add_argument("--bad-values", type=Path, help="more known-bad --set values, one per line (schema work)")
    a = p.parse_args(argv)
    extra = [line.strip() for line in a.bad_values.read_text().splitlines() if line.strip()] if a.bad_values else []
    steps = a.steps.split(",")
    if unknown := sorted(set(steps) - set(STEPS)):
        p.error(f"--steps: unknown {', '.join(unknown)}; known: {', '.join(STEPS)}")
    c = Campaign(a.work, a.seed)
    t0 = time.time()
    for name, step in [("kills", lambda: c.kills(a.kills)),
                       ("engines", lambda: c.engine_kills(tuple(a.engines.split(",")), a.engine_kills)),
                       ("gc", lambda: c.gc_beside_run(a.gc_rounds)),
                       ("disk", c.full_disk), ("fuzz", lambda: c.fuzz(a.fuzz, extra))]:
        if name not in steps:
            continue
        t = time.time()
        print(f"{name}:", flush=True)
        step()
        print(f"  ({time.time() - t:.0f} s)", flush=True)
    print(f"\nfault campaign, seed {a.seed}, {time.time() - t0:.0f} s:")
    print(c.report())
    core = sum(c.counts[k] for k in ("records lost", "videos redone by a rerun", "items failed",
                                     "videos differing from an uninterrupted run", "hangs", "tracebacks",
                                     "wrong exit codes", "invalid values accepted"))
    return 1 if core else 0


if __name__ == "__main__":
    sys.exit(main())
