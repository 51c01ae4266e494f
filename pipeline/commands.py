"""What a domain command (``pipeline evaluate localize ...``, ``pipeline weights ...``) receives.

A stage's ``commands: {verb: "module:function"}`` in stages.yaml is called as
``fn(argv: list[str], cmd: CommandContext) -> int``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipeline.datasets import Dataset
from pipeline.runner import Planner, Workspace, parse_sets
from pipeline.stage_graph import StageGraph


@dataclass
class CommandContext:
    workspace: Workspace
    debug: bool = False
    json: bool = False

    @property
    def cache_dir(self) -> Path:
        return self.workspace.cache.root

    @property
    def graph(self) -> StageGraph:
        return self.workspace.graph

    @property
    def project_root(self) -> Path:
        return self.workspace.project_root

    def load_dataset(self, name_or_path: str | Path) -> Dataset:
        return self.workspace.load_dataset(name_or_path)

    def stage_dir(self, stage: str, dataset: Dataset | str, overrides: Iterable[str] = ()) -> Path | None:
        """The complete output directory of ``stage``'s current key for ``dataset`` (``overrides`` are
        ``--set`` strings), or None when that output does not exist yet."""
        if not isinstance(dataset, Dataset):
            dataset = self.load_dataset(dataset)
        states = Planner(self.workspace, dataset, parse_sets(list(overrides))).plan_all([stage])
        st = states[stage]
        return st.dir if st.done else None
