"""Child processes that end with the process that started them.

A forked worker re-parented to PID 1 after its driver was killed would run on (or block on its task
queue) for ever. Linux sends it SIGKILL when the parent dies (``PR_SET_PDEATHSIG``); elsewhere, and
should the parent die before the call, a watcher thread sees the parent pid change and exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_WATCH_S = 0.5


def die_with_parent(parent_pid: int) -> None:
    """Call first thing in a forked child; ``parent_pid`` is the parent's pid, taken before the fork."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl in this libc: the watcher alone
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), daemon=True, name="parent-watch").start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_WATCH_S)
    os._exit(1)
