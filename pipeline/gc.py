"""``pipeline gc``: remove what nothing keeps, and say what it keeps and why.

Kept always: the outputs of the current keys (default params, plus ``--set``-free plans) of every
manifest in ``data/`` and of the datasets named on the command line; every imported feature store
(any registration in ``<cache>/imports``, whatever manifest it belongs to); every stage key of a named
experiment (``run --name``); what a running stage reads or writes (``pipeline.locking``: held entries
are reported and never deleted, also when the run starts while gc is deciding); the resumable partial of a current key;
and whatever a kept output reads (its upstream outputs). Anonymous experiments (complete outputs of
whole stages under a key that is no longer current) go only with ``--experiments``. Dead partials
(``<key>.partial`` of a key that is not current and not locked: a crashed or abandoned run) go always,
even when a dataset's keys cannot be computed (an unset ``${VAR}``); its complete outputs are then
kept whole, as is every output without a manifest.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cache import dir_size, leftovers, remove_leftovers
from pipeline.datasets import known_manifests
from pipeline.errors import ConfigError
from pipeline.locking import claim, is_locked
from pipeline.runner import Planner, Workspace


HELD = "a running stage reads or writes it"


@dataclass
class GcResult:
    removed: list[tuple[str, int]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (directory, why)
    kept_unknown: list[str] = field(default_factory=list)  # datasets whose outputs were kept whole
    held: list[str] = field(default_factory=list)  # entries a running stage reads or writes
    leftovers: list[str] = field(default_factory=list)  # temporary files of killed writes

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.removed)


def roots(ws: Workspace, extra_datasets: list[str]) -> tuple[dict[tuple[str, str], str], set[str]]:
    """(stage, key) -> why it is kept, and the names of datasets whose keys cannot all be computed now."""
    from pipeline.experiments import experiments
    from pipeline.store.imports import registrations

    keep: dict[tuple[str, str], str] = {}
    unknown: set[str] = set()
    for _, reg in registrations(ws.cache.root):
        keep[("extract", reg["key"])] = f"imported features of {reg.get('manifest') or reg.get('dataset')}"
    for e in experiments(ws.cache.root):
        for stage, key in e.get("keys", {}).items():
            keep.setdefault((stage, key), f"named experiment {e['name']}")
    named = [ws.load_dataset(source) for source in extra_datasets]  # a typo is an error, not a root less
    for source in known_manifests(ws.project_root):
        try:
            named.append(ws.load_dataset(source))
        except ConfigError:
            unknown.add(Path(source).stem)
    for dataset in named:
        try:
            states = Planner(ws, dataset).plan_all(ws.graph.for_task(dataset.task) or list(ws.graph.order))
        except ConfigError:
            unknown.add(dataset.name)
            continue
        for name, st in states.items():
            if st.key is not None:
                keep.setdefault((name, st.key), f"current key of dataset {dataset.name}")
        if any(st.state == "unknown" for st in states.values()):
            unknown.add(dataset.name)  # e.g. its videos are not mounted: its downstream keys are unknown
    return keep, unknown


def collect_garbage(ws: Workspace, extra_datasets: list[str], dry_run: bool, experiments: bool = False) -> GcResult:
    keep, unknown = roots(ws, extra_datasets)
    result = GcResult(kept_unknown=sorted(unknown))
    kept: dict[Path, str] = {}
    doomed: list[Path] = []
    undecided: list[tuple[Path, dict | None]] = []
    for stage in ws.graph.order:
        per_item = ws.graph[stage].per_item
        for d in ws.cache.stage_outputs(stage):
            partial = d.name.endswith(".partial")
            key = d.name.removesuffix(".partial")
            if is_locked(ws.cache.root, stage, key):
                kept[d] = HELD
                result.held.append(str(d))
            elif (stage, key) in keep:
                kept[d] = keep[(stage, key)] + (" (resumable partial run)" if partial else "")
            elif partial and not per_item:
                doomed.append(d)  # a dead run: nothing current will resume it
            else:
                undecided.append((d, ws.cache.read_manifest(d)))
    for d, manifest in undecided:
        owner = manifest.get("dataset") if manifest else None
        stage = d.parent.name
        if unknown and (owner is None or owner in unknown):
            kept[d] = f"dataset {owner or '?'}: its current keys cannot be computed now"
        elif not ws.graph[stage].per_item and not experiments:
            kept[d] = "anonymous experiment (pipeline gc --experiments removes it)"
    # what a kept output reads stays too
    todo = [d for d in kept]
    while todo:
        manifest = ws.cache.read_manifest(todo.pop())
        for up in ((manifest or {}).get("upstream") or {}).values():
            up = Path(up)
            if up not in kept and up.exists():
                kept[up] = "read by a kept output"
                todo.append(up)
    doomed += [d for d, _ in undecided if d not in kept]
    for d in sorted(doomed):
        stage, key = d.parent.name, d.name.removesuffix(".partial")
        with claim(ws.cache.root, stage, key) as free:
            if not free:  # a run began using it after the decision above
                result.held.append(str(d))
                continue
            size = dir_size(d)
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
        result.removed.append((str(d), size))
    result.kept = sorted((str(d), why) for d, why in kept.items() if why != HELD)
    found = leftovers(ws.cache.root)
    if not dry_run:
        remove_leftovers(ws.cache.root)
    result.leftovers = [str(p) for p in found]
    return result
