"""Stage keys: one digest over everything that decides a stage's output, and nothing else.

The key material (kept in the stage manifest under ``inputs`` so ``status`` can say what changed):
stage name, dataset identity, resolved params (file params by content), code (explicit version, or
the digest of the ``code`` packages' source files), and each upstream stage's key plus a digest of
the upstream item records it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

KEY_FORMAT = 1


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest(obj: Any, length: int = 32) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:length]


def stage_key(material: Mapping[str, Any]) -> str:
    return digest(material, 24)


def code_files(package_paths: list[Path], index) -> dict[str, str]:
    """``package/relative/file.py`` -> content digest for every Python source file of the packages."""
    paths: list[tuple[str, str]] = []
    for pkg in package_paths:
        if pkg.is_file():
            paths.append((pkg.name, str(pkg)))
            continue
        for dirpath, dirnames, filenames in os.walk(pkg):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for fn in filenames:
                if fn.endswith(".py"):
                    full = os.path.join(dirpath, fn)
                    paths.append((os.path.relpath(full, pkg.parent), full))
    digests = index.fingerprints(full for _, full in paths)
    return {rel: digests[os.path.abspath(full)] for rel, full in sorted(paths)}


def records_digest(records: Mapping[str, Mapping]) -> str:
    """Digest of the item records a downstream stage reads (id -> record)."""
    return digest(records)
