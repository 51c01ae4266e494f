"""Content fingerprints of source files, remembered in the cache so each file is hashed once.

The fast path is ``stat``: a file whose (size, mtime_ns, inode) match the remembered entry keeps its
remembered xxh3-128 digest and is never opened. The index is one SQLite file in the cache root (WAL
mode, busy timeout), safe for several pipeline processes at once; if it cannot be written the
digests are still correct, only not remembered.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterable

_CHUNK = 1 << 20
_SCHEMA = ("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
           "ino INTEGER, digest TEXT)")


def hash_file(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class FingerprintIndex:
    """``fingerprint(path)`` / ``fingerprints(paths)``; ``hashed`` counts the files actually read."""

    def __init__(self, db_path: Path | None):
        self.db_path = db_path
        self.hashed = 0
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is None and self.db_path is not None:
            try:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(_SCHEMA)
                self._db = db
            except (sqlite3.Error, OSError):
                self.db_path = None  # read-only or locked-up cache: hash without remembering
        return self._db

    def fingerprint(self, path: Path) -> str:
        return self.fingerprints([path])[os.path.abspath(path)]

    def fingerprints(self, paths: Iterable[Path]) -> dict[str, str]:
        """Absolute path string -> digest for every path (which must exist)."""
        stats = {}
        for p in paths:
            p = os.fspath(p)
            if not p.startswith("/"):
                p = os.path.abspath(p)
            st = os.stat(p)
            stats[p] = (st.st_size, st.st_mtime_ns, st.st_ino)
        known = self._lookup(list(stats))
        out, fresh = {}, []
        for p, token in stats.items():
            row = known.get(p)
            if row is not None and row[:3] == token:
                out[p] = row[3]
            else:
                out[p] = hash_file(Path(p))
                self.hashed += 1
                fresh.append((p, *token, out[p]))
        if fresh:
            self._store(fresh)
        return out

    def _lookup(self, paths: list[str]) -> dict[str, tuple]:
        db = self._connect()
        if db is None or not paths:
            return {}
        rows = {}
        try:
            for i in range(0, len(paths), 900):
                chunk = paths[i: i + 900]
                marks = ",".join("?" * len(chunk))
                for path, *rest in db.execute(
                        f"SELECT path, size, mtime_ns, ino, digest FROM files WHERE path IN ({marks})", chunk):
                    rows[path] = tuple(rest)
        except sqlite3.Error:
            return {}
        return rows

    def _store(self, rows: list[tuple]) -> None:
        db = self._connect()
        if db is None:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except sqlite3.Error:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
