"""``pipeline gc``: remove what no current stage key refers to.

Roots are the current keys (default params) of every stage for every manifest in ``data/`` plus the
datasets named on the command line, and the imported feature stores. A stage directory is swept
unless it is a root (or the partial of one), is locked by a running stage, or belongs to a dataset
whose keys cannot be computed now (unset variable, missing videos): those are kept whole.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cache import dir_size
from pipeline.datasets import known_manifests
from pipeline.errors import ConfigError
from pipeline.locking import is_locked
from pipeline.runner import Planner, Workspace, lookup_import


@dataclass
class GcResult:
    removed: list[tuple[str, int]] = field(default_factory=list)
    kept_unknown: list[str] = field(default_factory=list)  # datasets whose outputs were kept whole

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.removed)


def roots(ws: Workspace, extra_datasets: list[str]) -> tuple[set[tuple[str, str]], set[str], set[str]]:
    """(stage, key) roots, stages to keep whole, names of datasets that could not be evaluated."""
    keep: set[tuple[str, str]] = set()
    keep_stage: set[str] = set()
    unknown: set[str] = set()
    sources = [str(p) for p in known_manifests(ws.project_root)] + list(extra_datasets)
    for source in sources:
        try:
            dataset = ws.load_dataset(source)
        except ConfigError:
            unknown.add(Path(source).stem)
            continue
        reg = lookup_import(ws.cache.root, dataset.name)
        if reg is not None:
            keep.add(("extract", reg["key"]))
        try:
            states = Planner(ws, dataset).plan_all(list(ws.graph.order))
        except ConfigError:
            unknown.add(dataset.name)
            continue
        uncertain: set[str] = set()
        for name, st in states.items():
            if st.state == "unknown" or any(n in uncertain for n in ws.graph[name].needs):
                uncertain.add(name)
            if st.key is not None:
                keep.add((name, st.key))
        if uncertain:
            unknown.add(dataset.name)
            keep_stage |= uncertain
    return keep, keep_stage, unknown


def collect_garbage(ws: Workspace, extra_datasets: list[str], dry_run: bool) -> GcResult:
    keep, keep_stage, unknown = roots(ws, extra_datasets)
    result = GcResult(kept_unknown=sorted(unknown))
    for stage in ws.graph.order:
        if stage in keep_stage:
            continue
        for d in ws.cache.stage_outputs(stage):
            key = d.name.removesuffix(".partial")
            if (stage, key) in keep or is_locked(ws.cache.root, stage, key):
                continue
            manifest = ws.cache.read_manifest(d)
            owner = manifest.get("dataset") if manifest else None
            if unknown and (owner is None or owner in unknown):
                continue
            size = dir_size(d)
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
            result.removed.append((str(d), size))
    return result
