"""Resolve params, plan stages in topological order and run the ones with work to do.

Planning reads only stages.yaml, the manifest, ``stat`` of the inputs (through the fingerprint index)
and the completion records; it never imports a stage's module. A stage's entry is imported only when
that stage has work.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache import Cache, remove_leftovers
from pipeline.code_graph import reachable_modules
from pipeline.context import Item, RunOptions, StageContext
from pipeline.datasets import Dataset, ensure_generated, list_items, load_dataset
from pipeline.errors import ConfigError, PipelineError, WorkFailed, environment_fault
from pipeline.fingerprints import FingerprintIndex
from pipeline.keys import KEY_FORMAT, code_files, records_digest, stage_key
from pipeline.stage_graph import StageGraph, StageSpec, load_stage_graph, load_yaml, locate_module

DONE_STATES = ("done", "imported")


@dataclass
class Workspace:
    """The stage graph, the cache and the fingerprint index one command works with."""

    graph: StageGraph
    cache: Cache
    index: FingerprintIndex

    @classmethod
    def open(cls, stages_path: Path, cache_dir: Path) -> "Workspace":
        cache = Cache(cache_dir)
        return cls(graph=load_stage_graph(stages_path), cache=cache, index=FingerprintIndex(cache.index_path))

    @property
    def project_root(self) -> Path:
        return self.graph.root

    def load_dataset(self, name_or_path: str | Path) -> Dataset:
        return load_dataset(name_or_path, self.project_root, self.cache.root)


# ---------------------------------------------------------------- params


@dataclass(frozen=True)
class Override:
    stage: str
    path: tuple[str, ...]
    value: Any
    source: str  # what to name in an error: "--set x.y=z" or the manifest file


def parse_sets(sets: list[str]) -> list[Override]:
    import yaml

    out = []
    for text in sets:
        lhs, eq, rhs = text.partition("=")
        parts = tuple(lhs.strip().split("."))
        if not eq or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {text}: expected stage.param=value")
        try:
            value = load_yaml(rhs) if rhs.strip() else ""
        except yaml.YAMLError:
            value = rhs
        out.append(Override(parts[0], parts[1:], value, f"--set {text}"))
    return out


def parse_config(path: str | Path) -> list[Override]:
    """``--config FILE``: the keys ``--set`` takes, as a file (``{localize: {epochs: 5, model: {...}}}``).
    A file with a top-level ``params:`` (a manifest, the ``config.json`` a run wrote) gives that mapping."""
    import yaml

    p = Path(path).expanduser()
    try:
        raw = load_yaml(p.read_text())
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if isinstance(raw, dict) and isinstance(raw.get("params"), dict):
        raw = raw["params"]
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"--config {path}: expected a mapping of stage -> {{param: value}}")
    return [Override(str(stage), (str(k),), v, f"{p}: {stage}.{k}")
            for stage, values in raw.items() for k, v in values.items()]


def resolve_params(graph: StageGraph, dataset: Dataset | None, sets: list[Override]
                   ) -> dict[str, tuple[dict, dict]]:
    """stage -> (params, runtime): stages.yaml defaults <- manifest ``params`` <- ``--config`` <- ``--set``
    (``sets`` holds the last two, in that order). A stage with a schema has every value checked here,
    its defaults included, and its ``check_params`` run: nothing bad gets past planning."""
    overrides: list[Override] = []
    if dataset is not None:
        for stage, values in dataset.params.items():
            if stage not in graph.stages:
                raise ConfigError(f"{dataset.path}: params.{stage}: unknown stage; known: {', '.join(graph.order)}")
            overrides += [Override(stage, (k,), v, f"{dataset.path}: params.{stage}.{k}") for k, v in values.items()]
    for o in overrides + list(sets):
        if o.stage not in graph.stages:
            raise ConfigError(f"{o.source}: unknown stage {o.stage!r}; known: {', '.join(graph.order)}")
    resolved = {}
    for name in graph.order:  # a stage's check_params sees the params of the stages it needs
        spec = graph.stages[name]
        mine = [o for o in overrides + list(sets) if o.stage == name]
        schema = graph.schema(name)
        if schema is None:
            resolved[name] = _apply_listed(spec, mine)
            continue
        defaults = [Override(name, (k,), v, f"{graph.path}: stages.{name}.{part}.{k}")
                    for part in ("params", "runtime") for k, v in getattr(spec, part).items()]
        params, runtime = _apply_schema(schema, defaults + mine)
        schema.check_params(params, {need: resolved[need][0] for need in spec.needs})
        resolved[name] = (params, runtime)
    return resolved


def _apply_schema(schema, overrides: list[Override]) -> tuple[dict, dict]:
    params: dict = {}
    runtime: dict = {}
    for o in overrides:
        for path, value in schema.expand(o.path, o.value):
            try:
                param, rest = schema.locate(path)
            except ConfigError as exc:
                raise ConfigError(f"{o.source}: {exc}") from None
            target = runtime if param.runtime else params
            _set(target, (param.key, *rest), value)
            where = o.source if len(o.path) == len(path) else f"{o.source}.{path[-1]}"
            schema.check(param, target[param.key], where)
    return params, runtime


def _apply_listed(spec: StageSpec, overrides: list[Override]) -> tuple[dict, dict]:
    """A stage without a schema: the keys its stages.yaml ``params`` / ``runtime`` list, nothing else."""
    params, runtime = copy.deepcopy(dict(spec.params)), copy.deepcopy(dict(spec.runtime))
    for o in overrides:
        top = o.path[0]
        target = params if top in spec.params else runtime if top in spec.runtime else None
        if target is None:
            known = ", ".join(list(spec.params) + list(spec.runtime)) or "none"
            raise ConfigError(f"{o.source}: unknown param {o.stage}.{top}; known: {known}")
        if len(o.path) > 1 and not isinstance(target.get(top), dict):
            raise ConfigError(f"{o.source}: {o.stage}.{top} is not a mapping (its default is "
                              f"{target.get(top)!r}); set it whole")
        _set(target, o.path, o.value)
    return params, runtime


def _set(target: dict, path: tuple[str, ...], value: Any) -> None:
    """Set ``path`` to ``value``; a mapping set onto a mapping merges into it."""
    for part in path[:-1]:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    last = path[-1]
    if isinstance(value, dict) and isinstance(target.get(last), dict):
        _deep_merge(target[last], value)
    else:
        target[last] = copy.deepcopy(value)


def _deep_merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)


# ---------------------------------------------------------------- planning


@dataclass
class StageState:
    """What planning knows about one stage for one dataset."""

    name: str
    state: str  # done | incomplete | missing | imported | blocked | unknown
    key: str | None = None
    dir: Path | None = None
    material: dict = field(default_factory=dict)
    code_files: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    inputs: list[tuple[str, str, str]] = field(default_factory=list)  # per-item: (id, path, fingerprint)
    todo: list[Item] = field(default_factory=list)  # per-item: items missing or changed
    unusable: list[tuple[str, str, str]] = field(default_factory=list)  # per-item: (file, path, reason)
    records: dict = field(default_factory=dict)      # per-item: id -> record of current, complete items
    reasons: list[str] = field(default_factory=list)

    def all_items(self) -> list[Item]:
        return [Item(vid, Path(path), fp) for vid, path, fp in self.inputs]

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES

    def upstream_material(self) -> dict:
        return {"key": self.key, "records": records_digest(self.records)}


class Planner:
    """Computes keys and states of the stages of one dataset, with params resolved once."""

    def __init__(self, ws: Workspace, dataset: Dataset, sets: list[Override] = ()):
        self.ws = ws
        self.dataset = dataset
        self.sets = list(sets)
        self.resolved = resolve_params(ws.graph, dataset, list(sets))
        self._inputs: list[tuple[str, str, str]] | None = None
        self._unusable: list[tuple[str, str, str]] = []
        self._keyframes: tuple[list[tuple[str, str, str]], list[str]] | None = None
        self._imports: dict | None | bool = False  # False: not looked up yet
        self._annotations_fp: str | None | bool = False
        self._reachable: dict[str, list] = {}  # stage -> its code files (one import-graph walk each)

    def inputs(self) -> list[tuple[str, str, str]]:
        """(id, absolute path, fingerprint) of every item of the dataset (Path objects are built only
        for the items a stage processes: on a no-op rerun over thousands of videos they would dominate)."""
        if self._inputs is None:
            pairs, self._unusable = list_items(self.dataset)
            fps = self.ws.index.fingerprints(p for _, p in pairs)
            self._inputs = [(vid, p, fps[p]) for vid, p in pairs]
        return self._inputs

    def keyframe_inputs(self) -> tuple[list[tuple[str, str, str]], list[str]]:
        """(keyframe id, video path, fingerprint) of every keyframe whose video is present, and the
        videos named by the annotations that are not (``pipeline.keyframe_items``)."""
        if self._keyframes is None:
            from pipeline.keyframe_items import keyframe_items

            if getattr(self.dataset, "ava", None) is None:
                raise ConfigError(f"{self.dataset.path}: a stage per keyframe needs a detect dataset "
                                  "(task: detect, with its AVA files)")
            self._keyframes = keyframe_items(self.dataset, self.inputs(), self.ws.index, self.ws.cache.root)
        return self._keyframes

    def imported(self) -> dict | None:
        if self._imports is False:
            self._imports = lookup_import(self.ws.cache.root, self.dataset)
        return self._imports

    def annotations_fingerprint(self) -> str | None:
        if self._annotations_fp is False:
            a = self.dataset.annotations
            if self.dataset.ava is not None:
                named = {k: p for k, p in self.dataset.ava.files().items() if p.is_file()}
                fps = self.ws.index.fingerprints(named.values())
                self._annotations_fp = records_digest({k: fps[os.path.abspath(p)] for k, p in named.items()})
            elif a is None or not a.exists():
                self._annotations_fp = None
            elif a.is_dir():
                files = sorted(p for p in a.rglob("*") if p.is_file())
                fps = self.ws.index.fingerprints(files)
                self._annotations_fp = records_digest({str(p.relative_to(a)): fps[os.path.abspath(p)]
                                                       for p in files})
            else:
                self._annotations_fp = self.ws.index.fingerprint(a)
        return self._annotations_fp

    def plan(self, name: str, upstream: dict[str, StageState]) -> StageState:
        spec = self.ws.graph[name]
        params, runtime = self.resolved[name]
        if name == "extract" and (reg := self.imported()) is not None:
            d = Path(reg["dir"])
            records = self.ws.cache.read_records(d)
            return StageState(name, "imported", key=reg["key"], dir=d, params=params, runtime=runtime,
                              records=records, reasons=[f"imported from {reg.get('source', d)}"])
        for need in spec.needs:
            up = upstream[need]
            if not up.done and not (up.state == "incomplete" and up.records):
                return StageState(name, "blocked", params=params, runtime=runtime,
                                  reasons=[f"waits for {need} (not done)"])
        files = self._code_files(spec)
        material = {
            "format": KEY_FORMAT,
            "stage": name,
            "dataset": self._dataset_material(spec),
            "params": self._key_params(spec, params),
            "code": {"version": spec.version} if spec.version is not None else {"source": records_digest(files)},
            "upstream": {need: upstream[need].upstream_material() for need in spec.needs},
        }
        key = stage_key(material)
        st = StageState(name, "missing", key=key, dir=self.ws.cache.stage_dir(name, key), material=material,
                        code_files=files, params=self._run_params(spec, params), runtime=runtime)
        if spec.per_item:
            self._plan_items(spec, st)
        elif self.ws.cache.is_complete(name, key):
            st.state = "done"
        return st

    def _plan_items(self, spec: StageSpec, st: StageState) -> None:
        if self.dataset.videos is None or not self.dataset.videos.is_dir():
            st.state = "unknown"
            st.reasons.append(self.dataset.videos_error or f"videos directory not found: {self.dataset.videos}")
            return
        if spec.per_item == "keyframes" and getattr(self.dataset, "ava", None) is None:
            st.reasons.append("no keyframes: not a detect dataset")   # `run` refuses it; gc and status go on
        elif spec.per_item == "keyframes":
            st.inputs, missing = self.keyframe_inputs()
            if missing:
                st.reasons.append(f"{len(missing)} annotated video(s) have no file in {self.dataset.videos}, "
                                  f"e.g. {', '.join(missing[:3])}; their keyframes are left out")
        else:
            st.inputs = self.inputs()
        st.unusable = self._unusable
        if st.unusable:
            shown = ", ".join(f"{name} ({why})" for name, _, why in st.unusable[:5])
            st.reasons.append(f"{len(st.unusable)} file(s) are not usable videos: {shown}"
                              + (" ..." if len(st.unusable) > 5 else ""))
        records = self.ws.cache.read_records(st.dir)
        st.todo = [Item(vid, Path(path), fp) for vid, path, fp in st.inputs
                   if records.get(vid, {}).get("source_fingerprint") != fp]
        todo_ids = {it.id for it in st.todo}
        st.records = {vid: records[vid] for vid, _, _ in st.inputs if vid not in todo_ids}
        has_manifest = self.ws.cache.read_manifest(st.dir) is not None
        if not st.todo and has_manifest:
            st.state = "done"
        elif st.records or has_manifest:
            st.state = "incomplete"

    def _dataset_material(self, spec: StageSpec) -> dict:
        if spec.per_item:  # the videos' identity: manifests annotating one video set share its extraction
            return {"name": self.dataset.videos_name}
        return {"name": self.dataset.name, "splits": self.dataset.splits,
                "annotations": self.annotations_fingerprint()}

    def _code_files(self, spec: StageSpec) -> dict[str, str]:
        """The source files of ``spec.code`` its entry can reach (pipeline.code_graph) by digest."""
        if spec.name not in self._reachable:
            self._reachable[spec.name] = self._reachable_files(spec)
        return dict(sorted(code_files(self._reachable[spec.name], self.ws.index).items()))

    def _reachable_files(self, spec: StageSpec) -> list:
        packages = {pkg: self.ws.graph.locate_package(spec.name, pkg) for pkg in spec.code}
        entry_module = spec.entry.split(":")[0]
        top = entry_module.split(".")[0]
        if top not in packages and (origin := locate_module(top, self.ws.graph.search_path())) is not None:
            packages[top] = origin.parent if origin.name == "__init__.py" else origin
        return list(reachable_modules(spec.entry, packages).values())

    def _file_param(self, spec: StageSpec, where: str, value: Any, as_key: bool) -> Any:
        """A file param (a path, or a mapping / list of paths such as two-stream weights) with every
        path replaced by its content fingerprint (``as_key``: so moving a checkpoint keeps the key)
        or by its absolute path (what the stage receives)."""
        if value is None or value == "":
            return None
        if isinstance(value, dict):
            return {k: self._file_param(spec, f"{where}.{k}", v, as_key) for k, v in value.items()}
        if isinstance(value, list):
            return [self._file_param(spec, f"{where}[{i}]", v, as_key) for i, v in enumerate(value)]
        path = Path(str(value)).expanduser()
        candidates = [path] if path.is_absolute() else [Path.cwd() / path, self.ws.project_root / path]
        found = next((c.resolve() for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{spec.name}.{where}: file not found: {value}")
        return {"file_fingerprint": self.ws.index.fingerprint(found)} if as_key else str(found)

    def check_files(self, name: str) -> None:
        spec = self.ws.graph[name]
        for p in spec.file_params:
            self._file_param(spec, p, self.resolved[name][0].get(p), as_key=False)

    def _key_params(self, spec: StageSpec, params: dict) -> dict:
        out = dict(params)
        for p in spec.file_params:
            out[p] = self._file_param(spec, p, params.get(p), as_key=True)
        return out

    def _run_params(self, spec: StageSpec, params: dict) -> dict:
        out = copy.deepcopy(params)
        for p in spec.file_params:
            out[p] = self._file_param(spec, p, params.get(p), as_key=False)
        return out

    def config_of(self, name: str) -> dict:
        """The resolved values of ``name`` and the stages it needs, as a ``--config`` file holds them."""
        out = {}
        for n in self.ws.graph.closure([name]):
            params, runtime = self.resolved[n]
            out[n] = {**self._run_params(self.ws.graph[n], params), **runtime}
        return out

    def check_inputs(self, names: list[str]) -> None:
        """The ``check_inputs`` hook of each stage of ``names`` whose schema has one. It gets the outputs of
        the stages it needs that are already complete (those not made yet are checked when they run) as a
        call, since planning them reads their records: a hook with nothing to check costs nothing."""
        for name in names:
            schema = self.ws.graph.schema(name)
            if schema is None or not schema.checks_inputs:
                continue

            def outputs(name=name) -> dict[str, Path]:
                states = self.plan_all([name])
                return {n: st.dir for n, st in states.items() if n != name and st.done and st.dir is not None}

            schema.check_inputs(self._run_params(self.ws.graph[name], self.resolved[name][0]), outputs)

    def plan_all(self, names: list[str]) -> dict[str, StageState]:
        states: dict[str, StageState] = {}
        for name in self.ws.graph.closure(names):
            states[name] = self.plan(name, states)
        return states


def lookup_import(cache_root: Path, dataset: Dataset) -> dict | None:
    from pipeline.store.imports import lookup  # light: numpy, zarr and h5py load only with a store

    return lookup(cache_root, dataset)


# ---------------------------------------------------------------- running


@dataclass
class StageReport:
    name: str
    status: str  # ran | cached | imported | failed | skipped
    key: str | None = None
    dir: str | None = None
    seconds: float = 0.0
    items: dict = field(default_factory=dict)
    summary: str | None = None
    message: str | None = None
    failures: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def targets_for(graph: StageGraph, dataset: Dataset, what: str, stage: str | None) -> list[str]:
    """``run <stage>`` / ``run train --stage S`` / ``run eval --stage S`` / ``run all`` -> stage names."""
    if what == "all":
        names = graph.for_task(dataset.task)
        if not names:
            raise ConfigError(f"{graph.path}: no stage lists task {dataset.task!r} of dataset {dataset.name} "
                              f"in its tasks")
        return names
    if what in ("train", "eval"):
        if not stage:
            trainable = [n for n in graph.order if f"{n}_eval" in graph.stages]
            raise ConfigError(f"run {what}: --stage is required; one of: {', '.join(trainable)}")
        name = stage if what == "train" else f"{stage}_eval"
        if name not in graph.stages:
            raise ConfigError(f"run {what} --stage {stage}: no stage {name!r} in {graph.path}; "
                              f"known: {', '.join(graph.order)}")
        return [name]
    if stage:
        raise ConfigError(f"run {what}: --stage goes with 'run train' or 'run eval' only")
    if what not in graph.stages:
        raise ConfigError(f"run {what}: unknown stage; known: {', '.join(graph.order)}, train, eval, all")
    return [what]


def run(ws: Workspace, dataset: Dataset, targets: list[str], sets: list[Override], options: RunOptions,
        wait: bool = True) -> list[StageReport]:
    planner = Planner(ws, dataset, sets)  # every param and runtime value checked here
    names = ws.graph.closure(targets)
    check_splits(ws.graph, dataset, planner.resolved, names)
    imported = planner.imported() is not None
    for name in names:
        if not (name == "extract" and imported):
            ws.graph.check_entry(name)
            planner.check_files(name)  # a missing checkpoint fails now, not after hours of upstream work
    if dataset.generate is not None:  # generating the demo is the first work: after every check
        planner.dataset = dataset = ensure_generated(dataset, ws.cache.root)
    dataset.check_paths(need_videos=any(ws.graph[n].per_item and not (n == "extract" and imported)
                                        for n in names))
    for name in names:
        if ws.graph[name].per_item == "keyframes":
            planner.keyframe_inputs()  # a dataset without keyframes, or a malformed AVA file: exit 2 now
    planner.check_inputs(names)  # params against outputs already made (released weights vs a store)
    from pipeline.locking import Holds

    with Holds(ws.cache.root) as holds:
        return _run_stages(ws, planner, names, targets, options, wait, holds)


def _run_stages(ws: Workspace, planner: Planner, names: list[str], targets: list[str], options: RunOptions,
                wait: bool, holds) -> list[StageReport]:
    from pipeline.locking import stage_lock

    states: dict[str, StageState] = {}
    reports: list[StageReport] = []
    failed: set[str] = set()
    for name in names:
        spec = ws.graph[name]
        bad = [n for n in spec.needs if n in failed]
        if bad:
            failed.add(name)
            reports.append(StageReport(name, "skipped", message=f"needs {', '.join(bad)}, which failed"))
            continue
        force = options.force and name in targets
        st = planner.plan(name, states)
        if st.key is not None:
            # Held until the run ends, so gc leaves it alone; planned again once held, in case a gc
            # was deleting it just then.
            holds.hold(name, st.key)
            st = planner.plan(name, states)
        states[name] = st
        if st.state == "imported":
            reports.append(_cached_report(ws, st, "imported"))
            continue
        if st.key is None:  # an upstream stage ended with no complete item to read
            failed.add(name)
            reports.append(StageReport(name, "skipped", message="; ".join(st.reasons)))
            continue
        if st.done and not force:
            reports.append(_cached_report(ws, st, "cached"))
            continue
        with stage_lock(ws.cache.root, name, st.key, wait=wait, quiet=options.json):
            st = planner.plan(name, states)  # another run may have finished it while we waited
            states[name] = st
            if st.done and not force:
                reports.append(_cached_report(ws, st, "cached"))
                continue
            report = _execute(ws, planner, ws.graph[name], st, states, options, force)
        reports.append(report)
        if report.status == "failed":
            failed.add(name)
            if options.fail_fast:
                break
        else:  # what dependants see: the committed output, the records now complete
            states[name] = planner.plan(name, states)
    if options.name:
        from pipeline.experiments import record_experiment

        record_experiment(ws.cache.root, options.name, planner.dataset, [o.source for o in planner.sets],
                          {n: st.key for n, st in states.items() if st.key is not None})
    return reports


def check_splits(graph: StageGraph, dataset: Dataset, resolved: dict[str, tuple[dict, dict]],
                 names: list[str]) -> None:
    """Params naming a split of the dataset (``SplitName``) of the stages to run: the manifest has it (a
    detect dataset: a role of its ``splits`` or a split its annotations or proposals name)."""
    from pipeline.schema import SplitName

    for name in names:
        schema = graph.schema(name)
        for param in schema.marked(SplitName) if schema else ():
            value = resolved[name][param.runtime].get(param.key)
            if value is not None and dataset.ava is not None:
                dataset.ava.resolve_split(value)  # a role of its splits or a split name, else exit 2
            elif value is not None and value not in dataset.splits:
                raise ConfigError(f"{dataset.path}: splits: no {value!r} split, which {name}.{param.key} names "
                                  f"(has {', '.join(sorted(dataset.splits)) or 'none'})")


def _cached_report(ws: Workspace, st: StageState, status: str) -> StageReport:
    manifest = ws.cache.read_manifest(st.dir) or {}
    n = len(st.inputs) or len(st.records)
    items = {"total": n, "done": 0, "skipped": n, "failed": 0} if n else {}
    # A per-item stage's summary tells of the run that made it (items done, seconds): replayed under
    # "cached" it would contradict the item counts above, so only whole stages' results are shown again.
    replay = status == "imported" or not ws.graph[st.name].per_item
    summary = (manifest.get("result") or {}).get("summary") if replay else None
    return StageReport(st.name, status, key=st.key, dir=str(st.dir), items=items, summary=summary)


def _load_entry(graph: StageGraph, spec: StageSpec):
    module, fn = spec.entry.split(":")
    root = str(graph.root)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        return getattr(importlib.import_module(module), fn)
    except PipelineError:
        raise
    except Exception as exc:
        raise ConfigError(f"{graph.path}: stages.{spec.name}.entry: cannot import {spec.entry}: "
                          f"{type(exc).__name__}: {exc}") from exc


def _unhashed_modules(new_modules: set[str], code_files: dict[str, str], packages: list[str]) -> list[str]:
    """Source files of the stage's ``code`` packages that it imported while running but that its key
    does not hash."""
    missed = []
    for name in sorted(new_modules):
        inside = any(name == p or name.startswith(p + ".") for p in packages)
        if not inside or getattr(sys.modules.get(name), "__file__", None) is None:
            continue
        rel = name.replace(".", "/") + ("/__init__.py" if sys.modules[name].__file__.endswith("__init__.py") else ".py")
        if rel not in code_files:
            missed.append(rel)
    return missed


def _execute(ws: Workspace, planner: Planner, spec: StageSpec, st: StageState, states: dict[str, StageState],
             options: RunOptions, force: bool) -> StageReport:
    fn = _load_entry(ws.graph, spec)
    if spec.per_item:
        out_dir = st.dir
        out_dir.mkdir(parents=True, exist_ok=True)
        items = st.all_items() if force else st.todo
    else:
        out_dir = ws.cache.begin_whole(spec.name, st.key, force)
        items = []
    run_name = options.name or f"{planner.dataset.name}-{st.key[:12]}"
    # Temporary files of a killed earlier attempt (they would end up inside the finished output);
    # a per-item stage's records only: its store may hold many files.
    remove_leftovers(out_dir, recursive=False)
    remove_leftovers(out_dir / "items", recursive=False)
    ctx = StageContext(name=spec.name, key=st.key, params=st.params, runtime=st.runtime, dataset=planner.dataset,
                       out_dir=out_dir, upstream={n: states[n].dir for n in spec.needs}, items=items,
                       all_items=st.all_items(), options=options, config=planner.config_of(spec.name),
                       board_dir=ws.cache.root / "tensorboard" / run_name / spec.name)
    started = time.time()
    report = StageReport(spec.name, "ran", key=st.key, dir=str(st.dir))
    # under --json stdout carries one JSON object: whatever the stage prints goes to stderr
    quiet_stdout = contextlib.redirect_stdout(sys.stderr) if options.json else contextlib.nullcontext()
    try:
        for name, path, why in st.unusable:  # into the failures file; the videos go on
            ctx.item_failed(Item(name, Path(path), ""), "unusable_file", why)
        loaded_before = set(sys.modules)
        with quiet_stdout:
            result = fn(ctx)
        unhashed = _unhashed_modules(set(sys.modules) - loaded_before, st.code_files, spec.code)
        if unhashed:  # the static import graph missed them: edits there would not rerun this stage
            ctx.log(f"warning: {spec.name} ran code outside its key: {', '.join(unhashed)}")
        if result is not None and not isinstance(result, dict):
            raise TypeError(f"stage entry {spec.entry} returned {type(result).__name__}, expected a dict or None")
        result = json.loads(json.dumps(result or {}, default=str))
    except WorkFailed as exc:  # --fail-fast on an item failure
        return _failed(report, str(exc), ctx, started)
    except PipelineError:
        raise
    except OSError as exc:  # the machine refused (space, permissions): the run stops, in one line
        if options.debug:
            traceback.print_exc()
        raise environment_fault(exc, out_dir) from exc
    except Exception as exc:
        if options.debug:
            traceback.print_exc()
        return _failed(report, f"{type(exc).__name__}: {exc}", ctx, started)
    finished = time.time()
    report.seconds = finished - started
    report.summary = result.get("summary")
    report.failures = list(ctx.failures)
    manifest = {
        "stage": spec.name, "key": st.key, "dataset": planner.dataset.name, "params": st.params,
        "runtime": st.runtime, "inputs": st.material, "code_files": st.code_files, "result": result,
        **({"code_unhashed": unhashed} if unhashed else {}),
        "timings": {"started": started, "finished": finished, "seconds": round(finished - started, 3)},
        "finished": finished, "upstream": {n: str(states[n].dir) for n in spec.needs},
    }
    if spec.per_item:
        records = ws.cache.read_records(out_dir)
        failed_ids = {f["id"] for f in ctx.failures}
        for it in items:
            if records.get(it.id, {}).get("source_fingerprint") != it.fingerprint and it.id not in failed_ids:
                report.failures.append({"id": it.id, "stage": spec.name, "kind": "not-recorded",
                                        "message": "the stage returned without recording this item",
                                        "path": str(it.path)})
        n_unusable = len({name for name, _, _ in st.unusable})
        n_failed = len({f["id"] for f in report.failures})
        report.items = {"total": len(st.inputs) + n_unusable, "done": len(items) - (n_failed - n_unusable),
                        "skipped": len(st.inputs) - len(items), "failed": n_failed}
        manifest["items"] = report.items
        ws.cache.write_records_snapshot(out_dir, records)
        ws.cache.write_manifest(out_dir, manifest)
    elif ctx.failures:
        report.status = "failed"
        report.message = f"{len(ctx.failures)} item(s) failed; output kept in {out_dir} (not marked done)"
    else:
        ws.cache.commit_whole(spec.name, st.key, manifest)
    return report


def _failed(report: StageReport, message: str, ctx: StageContext, started: float) -> StageReport:
    report.status, report.message, report.failures = "failed", message, ctx.failures
    report.seconds = time.time() - started
    return report
