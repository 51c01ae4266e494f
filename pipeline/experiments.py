"""Named experiments, and the list and comparison of every run that wrote metrics.

An experiment is what one ``pipeline run ... --name NAME`` made: ``<cache>/experiments/NAME.json``
records its dataset, manifest, ``--set`` overrides and the key of every stage it planned; gc keeps
those keys. A run that is not named is known by its key (anonymous).

Generic over stages: a stage's output is a run to list when it holds ``metrics.json`` of the shape
``{"mAP": number | [one per threshold], "tious" or "tolerances" (seconds, point events): [thresholds]
(optional), "average_mAP": number
(optional), "per_class": {class: {"ap": number | [one per threshold]}}}`` (evaluation stages
write it). No torch, no domain import: the PR-curve plot of ``compare --plot`` is the
compared stage's ``compare-plot`` command (stages.yaml ``commands:``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.context import write_json_atomic
from pipeline.errors import ConfigError

DIR = "experiments"
METRICS = "metrics.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: expected letters, digits, '_', '-' or '.' (at most 64, "
                          f"starting with a letter or digit)")


def record_experiment(cache_root: Path, name: str, dataset, sets: list[str], keys: dict[str, str]) -> None:
    write_json_atomic(Path(cache_root) / DIR / f"{name}.json", {
        "name": name, "dataset": dataset.name, "manifest": str(dataset.path), "sets": list(sets),
        "keys": keys, "time": time.time()})


def experiments(cache_root: Path) -> list[dict]:
    out = []
    for p in sorted((Path(cache_root) / DIR).glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


@dataclass
class Run:
    stage: str
    key: str
    dir: Path
    dataset: str
    name: str | None
    status: str
    metrics: dict
    seconds: float
    finished: float
    params: dict = field(default_factory=dict)   # "stage.path" -> value over the run's chain of stages
    differs: list[str] = field(default_factory=list)  # "stage.path=value" where it differs from the defaults
    training: dict = field(default_factory=dict)  # what its training stage reported: parameters, seconds_per_epoch

    @property
    def label(self) -> str:
        return self.name or self.key[:12]

    def columns(self) -> list[tuple[str, float]]:
        """(column, value in %) of the metrics: mAP per threshold and their average, or one mAP."""
        m = self.metrics
        if isinstance(m.get("mAP"), list) and m.get("tolerances"):  # point events: seconds, not tIoU
            cols = [(f"@{t:g}s", 100 * v) for t, v in zip(m["tolerances"], m["mAP"])]
            avg = m.get("average_mAP", sum(m["mAP"]) / max(len(m["mAP"]), 1))
            return cols + [("avg", 100 * avg)]
        if isinstance(m.get("mAP"), list) and m.get("tious"):
            cols = [(f"@{t:.2f}", 100 * v) for t, v in zip(m["tious"], m["mAP"])]
            avg = m.get("average_mAP", sum(m["mAP"]) / max(len(m["mAP"]), 1))
            return cols + [("avg", 100 * avg)]
        if isinstance(m.get("mAP"), (int, float)):
            return [("mAP", 100 * m["mAP"])]
        return []

    def to_json(self) -> dict:
        """What ``runs --json`` and ``compare --json`` print of a run."""
        return {"name": self.name, "key": self.key, "stage": self.stage, "dataset": self.dataset,
                "status": self.status, "dir": str(self.dir), "seconds": self.seconds, "differs": self.differs,
                "params": self.params, "mAP": dict(self.columns()), "per_class": self.per_class(),
                "training": self.training}

    def per_class(self) -> dict[str, float]:
        """class -> AP in % (averaged over the thresholds)."""
        out = {}
        per_class = self.metrics.get("per_class") or {}
        if isinstance(per_class, list):  # detection: one entry per class, with its name
            per_class = {e["name"]: e for e in per_class if isinstance(e, dict) and "name" in e}
        for name, v in per_class.items():
            ap = v.get("average_ap", v.get("ap")) if isinstance(v, dict) else v
            if isinstance(ap, list):
                ap = sum(ap) / max(len(ap), 1)
            if isinstance(ap, (int, float)):
                out[name] = 100 * ap
        return out


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _chain(cache, manifest: dict, read: dict) -> list[dict]:
    """The manifest and those of its upstream outputs, nearest first; ``read`` keeps the manifests read
    so far (one extraction serves many runs: it is read once)."""
    out, todo, seen = [], [manifest], set()
    while todo:
        m = todo.pop(0)
        out.append(m)
        for d in (m.get("upstream") or {}).values():
            if d not in read:
                read[d] = cache.read_manifest(Path(d))
            if d not in seen and (up := read[d]) is not None:
                seen.add(d)
                todo.append(up)
    return out


# Fields of a training stage's result that `runs` shows beside the metrics: (column, width, format spec).
TRAINING_FIELDS = {"parameters": ("params", 10, ","), "seconds_per_epoch": ("s/epoch", 8, ".2f")}


def list_runs(ws, datasets: list[str] | None = None) -> list[Run]:
    """Every complete output with metrics (newest last), with its name, status and what differs from
    the defaults of its dataset (stages.yaml <- the manifest's params)."""
    from pipeline.runner import resolve_params

    named = experiments(ws.cache.root)
    names = {(stage, key): e["name"] for e in named for stage, key in e.get("keys", {}).items()}
    manifests = {e["dataset"]: e.get("manifest") for e in named}
    read: dict[str, dict | None] = {}
    defaults: dict[str, dict] = {}

    def defaults_of(name: str) -> dict:
        if name not in defaults:
            try:
                ds = ws.load_dataset(manifests.get(name) or name)
            except ConfigError:  # a manifest that is gone or broken: stages.yaml's defaults
                ds = None
            resolved = resolve_params(ws.graph, ds, [])
            defaults[name] = {k: v for stage, (params, _) in resolved.items()
                              for k, v in _flatten(params, f"{stage}.").items()}
        return defaults[name]

    runs = []
    for stage in ws.graph.order:
        if ws.graph[stage].per_item:
            continue
        for d in ws.cache.stage_outputs(stage):
            if d.name.endswith(".partial") or not (d / METRICS).is_file():
                continue
            manifest = ws.cache.read_manifest(d)
            if manifest is None or (datasets and manifest.get("dataset") not in datasets):
                continue
            try:
                metrics = json.loads((d / METRICS).read_text())
            except (OSError, ValueError):
                continue
            chain = _chain(ws.cache, manifest, read)
            params = {k: v for m in reversed(chain) for k, v in _flatten(m.get("params"), f"{m['stage']}.").items()}
            base = defaults_of(manifest.get("dataset", ""))
            own = {k: v for m in chain if "imported_from" not in m  # an import's params are its time mapping
                   for k, v in _flatten(m.get("params"), f"{m['stage']}.").items()}
            differs = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={json.dumps(v)}"
                       # a param absent from the defaults was set on purpose (stages.yaml lists only some)
                       for k, v in sorted(own.items()) if (k not in base or base[k] != v)
                       and not (isinstance(v, str) and Path(v).is_absolute())]  # file params: resolved paths
            seconds = sum((m.get("timings") or {}).get("seconds", 0.0) for m in chain
                          if not ws.graph.stages.get(m.get("stage"), None) or not ws.graph[m["stage"]].per_item)
            training = {k: v for m in reversed(chain) for k, v in (m.get("result") or {}).items()
                        if k in TRAINING_FIELDS and isinstance(v, (int, float))}
            runs.append(Run(stage, manifest["key"], d, manifest.get("dataset", "?"), names.get((stage, manifest["key"])),
                            "done", metrics, seconds, manifest.get("finished", 0.0), params, differs, training))
    shown = {r.name for r in runs}
    for e in named:  # named experiments without metrics yet: where they stand
        if e["name"] in shown or (datasets and e["dataset"] not in datasets):
            continue
        whole = [(s, k) for s, k in e.get("keys", {}).items() if s in ws.graph.stages and not ws.graph[s].per_item]
        if whole:
            stage, key = whole[-1]
            status = "interrupted" if ws.cache.partial_dir(stage, key).exists() else "not run"
            runs.append(Run(stage, key, ws.cache.stage_dir(stage, key), e["dataset"], e["name"], status, {},
                            0.0, e.get("time", 0.0), {}, list(e.get("sets", []))))
    return sorted(runs, key=lambda r: r.finished)


def find_run(runs: list[Run], ref: str) -> Run:
    """A run by experiment name, else by key prefix (one match)."""
    hits = [r for r in runs if r.name == ref and r.status == "done"] or \
           [r for r in runs if r.key.startswith(ref) and r.status == "done"]
    if not hits:
        raise ConfigError(f"compare: no finished run named {ref!r} or with a key starting {ref!r}; "
                          f"see `pipeline runs`")
    if len({(r.stage, r.key) for r in hits}) > 1:
        raise ConfigError(f"compare: {ref!r} names {len(hits)} runs ({', '.join(r.stage + '/' + r.key[:12] for r in hits)}); "
                          f"give a longer key")
    return hits[0]


def format_runs(runs: list[Run]) -> str:
    if not runs:
        return "no runs with metrics yet (pipeline run all --dataset D --name NAME)"
    lines = []
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.dataset, r.stage), []).append(r)
    for (dataset, stage), group in groups.items():
        cols = next((r.columns() for r in group if r.columns()), [])
        extra = [f for f in TRAINING_FIELDS if any(f in r.training for r in group)]
        width = max(12, *(len(r.label) for r in group))
        lines.append(f"dataset {dataset}, stage {stage} (mAP %)")
        lines.append(f"  {'experiment':<{width}}  {'status':<11} " + " ".join(f"{c:>6}" for c, _ in cols)
                     + "".join(f" {TRAINING_FIELDS[f][0]:>{TRAINING_FIELDS[f][1]}}" for f in extra)
                     + f" {'time':>7}  differs from the defaults")
        for r in group:
            values = dict(r.columns())
            cells = " ".join(f"{values[c]:6.2f}" if c in values else f"{'-':>6}" for c, _ in cols)
            for f in extra:
                _, w, spec = TRAINING_FIELDS[f]
                cells += f" {r.training[f]:>{w}{spec}}" if f in r.training else f" {'-':>{w}}"
            lines.append(f"  {r.label:<{width}}  {r.status:<11} {cells} {r.seconds:6.1f}s  "
                         + (", ".join(r.differs) or "-"))
        lines.append("")
    return "\n".join(lines).rstrip()


def format_compare(runs: list[Run]) -> str:
    labels = [r.label for r in runs]
    w = max(10, *(len(x) for x in labels))
    keys = sorted({k for r in runs for k in r.params})
    differ = [k for k in keys if len({json.dumps(r.params.get(k), sort_keys=True, default=str) for r in runs}) > 1]
    head = lambda first: f"{first:<34} " + " ".join(f"{x:>{w}}" for x in labels)  # noqa: E731
    lines = [head("param (differing)")]
    for k in differ:
        lines.append(f"{k:<34} " + " ".join(f"{json.dumps(r.params.get(k), default=str)[:w]:>{w}}" for r in runs))
    lines.append(f"({len(keys) - len(differ)} other params equal)")
    lines += ["", head("mAP (%)")]
    cols = list(dict.fromkeys(c for r in runs for c, _ in r.columns()))
    for c in cols:
        lines.append(f"{c:<34} " + " ".join(f"{dict(r.columns()).get(c, float('nan')):>{w}.2f}" for r in runs))
    classes = list(dict.fromkeys(c for r in runs for c in r.per_class()))
    if classes:
        kinds = [k for key, k in (("tious", "tIoU"), ("tolerances", "tolerances")) if any(r.metrics.get(key) for r in runs)]
        over = f", avg over {' or '.join(kinds)}" if kinds else ""
        lines += ["", head(f"AP per class (%{over})")]
        for c in classes:
            lines.append(f"{c[:34]:<34} " + " ".join(f"{r.per_class().get(c, float('nan')):>{w}.2f}" for r in runs))
    return "\n".join(lines)
