"""What a stage function receives: its resolved params, its dataset, where to write, what it reads.

Every stage entry in stages.yaml is ``module:function`` with the signature
``def fn(ctx: StageContext) -> dict | None``. The returned dict (JSON-able) is stored in the stage
manifest under ``result``; its ``summary`` string, if any, is printed after the run and again when
the stage is found cached (so ``pipeline run eval`` always shows the table).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping


@dataclass(frozen=True)
class Item:
    """One unit of per-item work (a video): its id (file stem), path and content fingerprint."""

    id: str
    path: Path
    fingerprint: str


@dataclass(frozen=True)
class RunOptions:
    """Command-line options that change how a stage runs, never what it outputs."""

    workers: int = 1
    backend: str = "local"  # local | ray | dask (pipeline.executors)
    address: str | None = None    # a running Ray / Dask cluster; None: a local one for the run
    gpus_per_task: float = 0.0    # GPUs each cluster task asks for
    fail_fast: bool = False
    force: bool = False
    debug: bool = False
    json: bool = False
    name: str | None = None  # the experiment's name (--name): labels its logs, never its key


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename: readers never see half a file."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file, fsync and a rename; a failed write (no space) names
    ``path`` and leaves no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.filename is None:  # a failed write names no file: name the one being written
            exc.filename = str(path)
        raise


def build_dir_atomic(final: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> None:
    """Unless ``complete(final)``, ``build`` into a temporary directory beside ``final`` and rename it in:
    a crash leaves no half directory, and of two concurrent builds the first rename wins (the second
    finds ``final`` complete). An incomplete or outdated ``final`` is replaced."""
    final = Path(final)
    if complete(final):
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        if final.exists():
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if not complete(final):  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save_torch_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file, fsync and a rename (a checkpoint is whole or absent)."""
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_csv_row(path: Path, row: Mapping[str, Any]) -> None:
    """Append one row to a CSV log (header first when the file is new), flushed to disk."""
    import csv

    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def write_item_record(records_dir: Path, item: Item, record: Mapping[str, Any] | None = None) -> dict:
    """Write ``item``'s completion record (atomically; rewriting it is harmless) and return it. Also
    called where a cluster task runs, so the record is committed where the item finished."""
    rec = dict(record or {})
    rec["id"] = item.id
    rec["source_fingerprint"] = item.fingerprint
    write_json_atomic(records_dir / f"{item.id}.json", rec)
    return rec


@dataclass
class StageContext:
    """Everything a stage function may use. Built by the runner; tests may build one by hand.

    - ``params``: the resolved stage params (stages.yaml defaults <- manifest ``params`` <- ``--set``),
      plain nested dicts/lists; ``runtime`` holds the params that do not enter the key
      (batch size, device, loader workers).
    - ``out_dir``: where the stage writes. Whole stages get a ``<key>.partial`` directory that survives a
      crash (so training can resume from it) and is renamed to ``<key>`` on success. Per-item stages
      get their persistent ``<key>`` directory, which accumulates items over runs.
    - ``upstream``: name -> output directory of each stage in ``needs`` (complete).
    - ``items`` / ``all_items``: per-item stages only: the items to (re)process now, and every item.
    - ``config``: stage -> params and runtime values, for this stage and every stage it needs, as
      resolved for this run: a valid ``--config`` file, so an output can say how to make it again.
    """

    name: str
    key: str
    params: Mapping[str, Any]
    runtime: Mapping[str, Any]
    dataset: Any  # pipeline.datasets.Dataset
    out_dir: Path
    upstream: Mapping[str, Path] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)
    all_items: list[Item] = field(default_factory=list)
    options: RunOptions = field(default_factory=RunOptions)
    config: Mapping[str, Any] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    done_count: int = 0
    # TensorBoard run directory: one log root for the cache, runs named after the experiment (or
    # dataset and key); None: the stage's own out_dir/tensorboard.
    board_dir: Path | None = None

    @property
    def records_dir(self) -> Path:
        return self.out_dir / "items"

    @property
    def failures_path(self) -> Path:
        return self.out_dir / "failures.jsonl"

    def item_done(self, item: Item, record: Mapping[str, Any] | None = None) -> None:
        """Mark one item complete. Call only after its data is durably written: this record is the
        completion mark the planner reads, and it carries the source fingerprint."""
        write_item_record(self.records_dir, item, record)
        self.done_count += 1

    def item_failed(self, item: Item, kind: str, message: str) -> None:
        """Record a per-item failure (the run goes on, and exits 1 at the end)."""
        entry = {"id": item.id, "stage": self.name, "kind": kind, "message": str(message).strip()[:2000],
                 "path": str(item.path), "time": time.time()}
        self.failures.append(entry)
        self.failures_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.failures_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.options.fail_fast:
            from pipeline.errors import WorkFailed

            raise WorkFailed(f"{item.path}: {kind}: {entry['message']}")

    def log(self, message: str) -> None:
        if not self.options.json:
            print(message, file=sys.stderr, flush=True)

    def progress(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it") -> Any:
        from pipeline.progress import progress

        return progress(iterable, total=total, desc=desc or self.name, unit=unit)
