"""The cache layout: ``<root>/<stage>/<key>/`` with ``manifest.json``.

- Whole stages run in ``<key>.partial/`` and are renamed to ``<key>/`` when they succeed, so a
  directory named by its key is complete by construction; the partial directory survives a crash
  (training resumes from it).
- Per-item stages keep one persistent ``<key>/`` holding ``items/<id>.json`` completion records; an
  item is done iff its record exists and carries the current source fingerprint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from pipeline.context import write_json_atomic

# What interrupted writes leave behind, named after the writing process: ``.<name>.<pid>.tmp`` (atomic
# file writes), ``.<name>.tmp-<pid>`` (the demo generator), ``<key>.old-<pid>`` (a --force swap).
_LEFTOVER = re.compile(r"^\..+\.(\d+)\.tmp$|\.tmp-(\d+)$|\.old-(\d+)$")
MANIFEST = "manifest.json"
RECORDS_SNAPSHOT = "records.json"


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def index_path(self) -> Path:
        return self.root / "fingerprints.sqlite"

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.partial"

    def read_manifest(self, directory: Path) -> dict | None:
        try:
            with open(directory / MANIFEST) as f:
                return json.load(f)
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None

    def is_complete(self, stage: str, key: str) -> bool:
        return (self.stage_dir(stage, key) / MANIFEST).is_file()

    def begin_whole(self, stage: str, key: str, force: bool) -> Path:
        partial = self.partial_dir(stage, key)
        if force and partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def commit_whole(self, stage: str, key: str, manifest: dict) -> Path:
        """Write the manifest last, then rename the partial directory into place (atomic)."""
        partial, final = self.partial_dir(stage, key), self.stage_dir(stage, key)
        write_json_atomic(partial / MANIFEST, manifest)
        _fsync_dir(partial)
        if final.exists():  # --force over a complete output: swap, then drop the old one
            old = final.with_name(f"{key}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, final)
        _fsync_dir(final.parent)
        return final

    def write_manifest(self, directory: Path, manifest: dict) -> None:
        write_json_atomic(directory / MANIFEST, manifest)

    def read_records(self, directory: Path) -> dict[str, dict]:
        """id -> record of every completion record in ``directory/items``.

        Served from the snapshot written at the end of the last run when no record was written,
        replaced or removed since (the ``items`` directory's mtime is older than the snapshot's): one
        file read instead of one per item on a no-op rerun.
        """
        snapshot = directory / RECORDS_SNAPSHOT
        try:
            if os.stat(snapshot).st_mtime_ns > os.stat(directory / "items").st_mtime_ns:
                with open(snapshot) as f:
                    return json.load(f)
        except (OSError, ValueError):
            pass
        records = {}
        try:
            entries = os.scandir(directory / "items")
        except (FileNotFoundError, NotADirectoryError):
            return records
        with entries:
            for e in entries:
                if e.name.endswith(".json") and not e.name.startswith("."):
                    try:
                        with open(e.path) as f:
                            rec = json.load(f)
                    except (OSError, json.JSONDecodeError):
                        continue  # unreadable record: the item counts as not done
                    records[e.name[:-5]] = rec
        return records

    def write_records_snapshot(self, directory: Path, records: dict[str, dict]) -> None:
        write_json_atomic(directory / RECORDS_SNAPSHOT, records)

    def stage_outputs(self, stage: str) -> list[Path]:
        """Every directory of a stage in the cache (complete, per-item and partial)."""
        d = self.root / stage
        return sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def manifests(self, stage: str, dataset: str) -> list[dict]:
        """Every complete manifest of ``stage`` for ``dataset``, newest first."""
        found = []
        for d in self.stage_outputs(stage):
            m = None if d.name.endswith(".partial") else self.read_manifest(d)
            if m and m.get("dataset") == dataset:
                found.append(m)
        return sorted(found, key=lambda m: m.get("finished", 0), reverse=True)


def dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for fn in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, fn)).st_size
            except OSError:
                pass
    return total


def leftovers(root: Path, recursive: bool = True) -> list[Path]:
    """Temporary files and directories under ``root`` whose writing process is gone (killed mid-write).
    A live writer's are never listed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            m = _LEFTOVER.search(name)
            if m and not pid_alive(int(next(g for g in m.groups() if g))):
                found.append(Path(dirpath) / name)
        dirnames[:] = [d for d in dirnames if recursive and not _LEFTOVER.search(d)]
    return sorted(found)


def remove_leftovers(root: Path, recursive: bool = True) -> list[Path]:
    removed = leftovers(root, recursive)
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    return removed


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
