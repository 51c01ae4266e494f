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


def code_files(files: list[Path], index) -> dict[str, str]:
    """``package/relative/file.py`` -> content digest of each file (``files`` lie in packages whose
    parent directory is the root the relative names start from)."""
    digests = index.fingerprints(files)
    return {_package_relative(f): digests[os.path.abspath(f)] for f in files}


def _package_relative(path: Path) -> str:
    """``localizers/nms.py`` for ``<root>/localizers/nms.py``: the path below the outermost directory
    that still holds an ``__init__.py``."""
    top = path.parent
    while (top.parent / "__init__.py").is_file():
        top = top.parent
    return path.relative_to(top.parent if (top / "__init__.py").is_file() else path.parent).as_posix()


def records_digest(records: Mapping[str, Mapping]) -> str:
    """Digest of the item records a downstream stage reads (id -> record)."""
    return digest(records)
