"""Locks of the cache: one writer per stage key, and holds that keep gc away from what runs read.

- ``stage_lock``: an exclusive ``flock`` on ``<cache>/.locks/<stage>-<key>.lock`` while a stage writes
  that key. A second run of the key waits for the first and then finds the work done; with
  ``--no-wait`` it fails with a message naming the holder.
- ``hold``: a shared ``flock`` on ``<stage>-<key>.hold`` for as long as a run reads or writes the key
  (the writer holds it too). ``gc`` takes it exclusively, without waiting, before it deletes an entry
  (``claim``), so it skips whatever a run holds and a run never reads an entry gc is deleting.

A ``flock`` belongs to the open file description, which a forked child shares: a decode worker that
outlived a killed driver would keep the lock for ever. So every child forked from a process that
holds lock descriptors closes its copies at once (``os.register_at_fork``; exec'd children never get
them: Python opens descriptors close-on-exec). The kernel then drops a lock when its holder dies.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError

_HELD: set[int] = set()  # lock descriptors open in this process


def _close_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)  # only this child's copy: the parent's lock stays
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def lock_path(cache_root: Path, stage: str, key: str) -> Path:
    return cache_root / ".locks" / f"{stage}-{key}.lock"


def hold_path(cache_root: Path, stage: str, key: str) -> Path:
    return cache_root / ".locks" / f"{stage}-{key}.hold"


def _open(path: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    if flags & os.O_CREAT:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, flags, 0o644)
    _HELD.add(fd)
    return fd


def _close(fd: int) -> None:
    _HELD.discard(fd)
    os.close(fd)  # releases the flock


@contextmanager
def stage_lock(cache_root: Path, stage: str, key: str, wait: bool = True, quiet: bool = False):
    fd = _open(lock_path(cache_root, stage, key))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 200, 0).decode(errors="replace").strip())
            if not wait:
                raise PipelineError(f"stage {stage} (key {key}) is being run by {holder}; "
                                    f"rerun without --no-wait to wait for it") from None
            if not quiet:
                print(f"{stage}: waiting for {holder} to finish key {key}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # who holds it, for the message of a second run; a full disk must not stop this one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError:
            pass
        yield
    finally:
        _close(fd)


def _holder(text: str) -> str:
    """Who holds a lock, from what its taker wrote: a pid of this host that is gone cannot hold it (the
    kernel dropped its lock), so then it is a process that outlived it."""
    parts = text.split()
    if len(parts) == 4 and parts[0] == "pid" and parts[1].isdigit() and parts[3] == socket.gethostname():
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return f"a process left behind by {text}, which is gone"
        except PermissionError:
            pass
    return text or "another process"


class Holds:
    """Shared holds a run keeps on every key it reads or writes, released when the run ends."""

    def __init__(self, cache_root: Path):
        self.cache_root = cache_root
        self.fds: dict[tuple[str, str], int] = {}

    def hold(self, stage: str, key: str) -> None:
        """Waits only while a gc deletes this very entry (then the caller plans it again)."""
        if (stage, key) in self.fds:
            return
        path = hold_path(self.cache_root, stage, key)
        try:
            fd = _open(path)
        except OSError:  # a read-only cache (a shared, finished one): read its lock if there, else no gc can
            try:
                fd = _open(path, os.O_RDONLY)
            except OSError:
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            _close(fd)
            raise
        self.fds[(stage, key)] = fd

    def release(self) -> None:
        for fd in self.fds.values():
            _close(fd)
        self.fds.clear()

    def __enter__(self) -> "Holds":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def claim(cache_root: Path, stage: str, key: str):
    """Yields True with the entry claimed for deletion (no run holds or writes it, and none can
    start reading it until the block ends), or False when something holds it."""
    if is_locked(cache_root, stage, key):
        yield False
        return
    fd = _open(hold_path(cache_root, stage, key))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        _close(fd)


def is_locked(cache_root: Path, stage: str, key: str) -> bool:
    """True while some process holds the key's writer lock (verify leaves running stages alone)."""
    path = lock_path(cache_root, stage, key)
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        _close(fd)
