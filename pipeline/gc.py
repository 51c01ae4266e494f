"""``pipeline gc``: remove what no current stage key refers to.

Roots are the current keys (default params) of every stage for every manifest in ``data/`` plus the
datasets named on the command line, and the imported feature stores. A stage directory is swept
unless it is a root (or the partial of one), is held by a running stage (``pipeline.locking``: what a
run reads or writes; reported, never deleted), or belongs to a dataset
whose keys cannot be computed now (unset variable, videos not mounted; a manifest that does not load
is known by its file stem): those are kept whole, as is every output without a manifest then.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cache import dir_size, leftovers, remove_leftovers
from pipeline.datasets import known_manifests
from pipeline.errors import ConfigError
from pipeline.locking import claim
from pipeline.runner import Planner, Workspace


@dataclass
class GcResult:
    removed: list[tuple[str, int]] = field(default_factory=list)
    kept_unknown: list[str] = field(default_factory=list)  # datasets whose outputs were kept whole
    held: list[str] = field(default_factory=list)  # entries a running stage reads or writes
    leftovers: list[str] = field(default_factory=list)  # temporary files of killed writes

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.removed)


def roots(ws: Workspace, extra_datasets: list[str]) -> tuple[set[tuple[str, str]], set[str]]:
    """(stage, key) roots, and the names of datasets whose keys cannot all be computed now."""
    keep: set[tuple[str, str]] = set()
    unknown: set[str] = set()
    named = [ws.load_dataset(source) for source in extra_datasets]  # a typo is an error, not a root less
    for source in known_manifests(ws.project_root):
        try:
            named.append(ws.load_dataset(source))
        except ConfigError:
            unknown.add(Path(source).stem)
    for dataset in named:
        try:
            planner = Planner(ws, dataset)
            reg = planner.imported()  # looked up once: planning extract reads the same registration
            if reg is not None:
                keep.add(("extract", reg["key"]))
            states = planner.plan_all(list(ws.graph.order))
        except ConfigError:
            unknown.add(dataset.name)
            continue
        keep |= {(name, st.key) for name, st in states.items() if st.key is not None}
        if any(st.state == "unknown" for st in states.values()):
            unknown.add(dataset.name)  # e.g. its videos are not mounted: its downstream keys are unknown
    return keep, unknown


def collect_garbage(ws: Workspace, extra_datasets: list[str], dry_run: bool) -> GcResult:
    keep, unknown = roots(ws, extra_datasets)
    result = GcResult(kept_unknown=sorted(unknown))
    for stage in ws.graph.order:
        for d in ws.cache.stage_outputs(stage):
            key = d.name.removesuffix(".partial")
            if (stage, key) in keep:
                continue
            manifest = ws.cache.read_manifest(d)
            owner = manifest.get("dataset") if manifest else None
            if unknown and (owner is None or owner in unknown):
                continue
            with claim(ws.cache.root, stage, key) as free:
                if not free:
                    result.held.append(str(d))
                    continue
                size = dir_size(d)
                if not dry_run:
                    shutil.rmtree(d, ignore_errors=True)
            result.removed.append((str(d), size))
    found = leftovers(ws.cache.root)
    if not dry_run:
        remove_leftovers(ws.cache.root)
    result.leftovers = [str(p) for p in found]
    return result
