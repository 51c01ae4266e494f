"""One lock per stage key (``flock`` on ``<cache>/.locks/<stage>-<key>.lock``).

A second run of the same key waits for the first and then finds the work done; with ``--no-wait``
it fails with a message naming the holder. The kernel drops the lock when its holder dies, so a
killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError


def lock_path(cache_root: Path, stage: str, key: str) -> Path:
    return cache_root / ".locks" / f"{stage}-{key}.lock"


@contextmanager
def stage_lock(cache_root: Path, stage: str, key: str, wait: bool = True, quiet: bool = False):
    path = lock_path(cache_root, stage, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                raise PipelineError(f"stage {stage} (key {key}) is being run by {holder}; "
                                    f"rerun without --no-wait to wait for it") from None
            if not quiet:
                print(f"{stage}: waiting for {holder} to finish key {key}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def is_locked(cache_root: Path, stage: str, key: str) -> bool:
    """True while some process holds the key's lock (used by gc to leave running stages alone)."""
    path = lock_path(cache_root, stage, key)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
