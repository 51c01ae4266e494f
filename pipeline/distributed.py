"""The CLI under ``torchrun``: rank 0 runs the command, the other ranks wait and run the distributed work
a stage hands out (data-parallel training), then exit with rank 0's exit code.

Only rank 0 plans, runs the other stages and commits outputs and records: ranks running the pipeline
side by side would plan, lock and write the same cache keys. A stage in rank 0 calls
:func:`run_everywhere` with a picklable function and its arguments; every rank then runs it, the stage's
own process group inside. Messages go through the store torchrun's rendezvous set up (``MASTER_ADDR``
/ ``MASTER_PORT``), one key per message, polled: the wait for rank 0's upstream work (hours of
extraction) is not a collective, which would time out, and a store that goes away (its node died) ends
the wait with an error. No process group is held between messages, so each job chooses its backend.
"""

from __future__ import annotations

import itertools
import os
import pickle
import time
from typing import Any, Callable

_POLL_S = 0.2
_store = None  # rank 0's connection to the store, while it runs the command
_sent = 0      # messages rank 0 has posted


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_ranks(command: Callable[[], int]) -> int:
    """Under torchrun: ``command()`` on rank 0, whose exit code every rank returns."""
    global _store
    store = _connect()
    if int(os.environ["RANK"]) != 0:
        return _follow(store)
    _store, code = store, 1
    try:
        code = command()
    finally:
        _store = None
        _post(store, ("exit", code))
    return code


def run_everywhere(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on every rank (on this process only outside torchrun); called by rank 0, the
    others receive it pickled, so ``fn`` is a module-level function."""
    if _store is not None:
        _post(_store, ("call", fn, args))
    return fn(*args)


def _connect():
    from torch import distributed as dist

    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore("pipeline", store)


def _post(store, message: tuple) -> None:
    global _sent
    store.set(str(_sent), pickle.dumps(message))
    _sent += 1


def _follow(store) -> int:
    for seq in itertools.count():
        key = str(seq)
        while not store.check([key]):
            time.sleep(_POLL_S)
        kind, *rest = pickle.loads(store.get(key))
        if kind == "exit":
            return int(rest[0])
        fn, args = rest
        fn(*args)
