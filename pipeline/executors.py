"""Independent tasks on a Ray or Dask cluster, each result handed back the moment its task finishes.

The engines' own futures (``ray.wait``, ``distributed.as_completed``), not joblib's ``parallel_config``:
through joblib, results come back in submission order once a whole batch is dispatched, a task cannot ask
for a GPU without the joblib back-end hanging silently when the cluster has too few (Ray), a worker that
dies takes the ``Parallel`` call down with it, and nothing can be cancelled when ``--fail-fast`` stops.
With native futures:

- work is handed out one task at a time (a few per worker in flight): a slow task holds one slot only;
- a result is yielded as soon as its task ends, so the caller commits, counts and stops early;
- a task whose worker died runs again elsewhere (Ray: ``max_retries``; Dask: the scheduler's
  ``allowed-failures``); past that it is yielded with the exception, so its items fail alone. The task
  may therefore run twice: what it writes must be idempotent;
- a GPU request (``num_gpus`` / Dask resource ``GPU``) the cluster cannot meet is refused before
  anything is submitted, instead of queueing for ever.

``address`` None starts a local cluster of ``workers`` processes for the call and stops it after;
otherwise the running cluster at ``address`` is used (Ray: ``auto`` or ``HOST:PORT``; Dask:
``tcp://HOST:PORT``) and ``workers`` only bounds the tasks in flight.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator

from pipeline.errors import ConfigError

BACKENDS = ("local", "ray", "dask")
CLUSTER_BACKENDS = ("ray", "dask")
# Tasks in flight per worker: the next one is queued while the last still runs.
_IN_FLIGHT_PER_WORKER = 2
# Runs of one task whose worker died, after the first.
RETRIES = 2


def stream(fn: Callable[[Any], Any], tasks: Iterable[Any], *, backend: str, workers: int = 1,
           address: str | None = None, gpus: float = 0.0) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """``(task, fn(task), None)`` for each task in the order they finish; ``(task, None, error)`` for a
    task that could not run (its worker died more than ``RETRIES`` times). Closing the generator
    cancels what has not finished."""
    tasks = list(tasks)
    if workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    if gpus < 0:
        raise ConfigError(f"--gpus-per-task: must be 0 or more, got {gpus:g}")
    if backend == "ray":
        return _ray(fn, tasks, workers, address, gpus)
    if backend == "dask":
        return _dask(fn, tasks, workers, address, gpus)
    raise ConfigError(f"--backend: a cluster back-end is one of {', '.join(CLUSTER_BACKENDS)}, got {backend!r}")


def check_installed(backend: str) -> None:
    """One line naming the extra to install when ``backend``'s engine cannot be imported."""
    module, extra = {"ray": ("ray", "ray"), "dask": ("distributed", "dask")}[backend]
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"--backend {backend}: {module} is not installed "
                          f"(pip install 'video-feature-pipeline[{extra}]')") from None


def _window(workers: int) -> int:
    return max(1, workers) * _IN_FLIGHT_PER_WORKER


def _ray(fn, tasks: list, workers: int, address: str | None, gpus: float):
    check_installed("ray")
    import ray

    started = not ray.is_initialized()
    if started:
        if address is None:
            # "local": a new cluster even where a `ray start` cluster runs, or left its address file behind
            # (ray.init() would join that one, and refuse num_cpus)
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"--address {address}: no Ray cluster there ({exc})") from None
    try:
        if gpus:
            most = max((node.get("Resources", {}).get("GPU", 0.0) for node in ray.nodes() if node.get("Alive")),
                       default=0.0)
            if most < gpus:
                raise ConfigError(f"--gpus-per-task {gpus:g}: no node of the Ray cluster has that many GPUs "
                                  f"(the most on one node: {most:g})")
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=RETRIES, retry_exceptions=False)(fn)
        yield from _ray_stream(ray, remote, tasks, _window(workers))
    finally:
        if started:
            ray.shutdown()


def _ray_stream(ray, remote, tasks: list, window: int):
    todo = list(reversed(tasks))
    running: dict = {}
    try:
        while todo or running:
            while todo and len(running) < window:
                task = todo.pop()
                running[remote.remote(task)] = task
            (ref,), _ = ray.wait(list(running), num_returns=1)
            task = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:   # the worker died RETRIES + 1 times
                yield task, None, exc
            else:
                yield task, result, None
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


def _dask(fn, tasks: list, workers: int, address: str | None, gpus: float):
    check_installed("dask")
    import dask
    from distributed import Client, LocalCluster

    cluster = None
    # Held for the whole run, not only the start: a nanny restarting a killed worker reads it again,
    # and a daemonic worker could not start the task's decode process. A saturation of 1: a worker
    # holds only the task it runs, so its death counts against that task alone (at the default 1.1
    # the task queued behind it is blamed too, and fails after RETRIES neighbours' deaths). No
    # statistical profiler: sampling every thread's stack each 10 ms doubled a task's CPU time.
    with dask.config.set({"distributed.scheduler.allowed-failures": RETRIES,
                          "distributed.scheduler.worker-saturation": 1.0,
                          "distributed.worker.daemon": False,
                          "distributed.worker.profile.enabled": False}):
        if address is None:
            share = _local_gpus() // workers
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=50,
                                   resources={"GPU": share} if share else None)
            client = Client(cluster)
            # The workers are this process's children: they end with it, even when it is killed.
            client.run(_die_with, os.getpid())
            for i, worker in enumerate(sorted(client.scheduler_info()["workers"])):
                if share:  # each worker sees its own GPUs, as Ray's workers do
                    client.run(_see_gpus, list(range(i * share, (i + 1) * share)), workers=[worker])
        else:
            try:
                client = Client(address, timeout=10)
            except (OSError, TimeoutError, ValueError) as exc:
                raise ConfigError(f"--address {address}: no Dask scheduler there ({exc})") from None
        try:
            if gpus:
                have = [w.get("resources", {}).get("GPU", 0.0) for w in client.scheduler_info()["workers"].values()]
                if max(have, default=0.0) < gpus:
                    raise ConfigError(f"--gpus-per-task {gpus:g}: no Dask worker declares that many GPUs "
                                      f"(start workers with --resources GPU=N; the most now: {max(have, default=0):g})")
            yield from _dask_stream(client, fn, tasks, _window(workers), {"GPU": gpus} if gpus else None)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def _dask_stream(client, fn, tasks: list, window: int, resources):
    from distributed import as_completed

    todo = list(reversed(tasks))
    running: dict = {}

    def submit() -> Any:
        task = todo.pop()
        future = client.submit(fn, task, pure=False, resources=resources)
        running[future.key] = task
        return future

    pending = as_completed([submit() for _ in range(min(window, len(todo)))])
    try:
        for future in pending:
            task = running.pop(future.key)
            if todo:
                pending.add(submit())
            if future.status == "error":
                yield task, None, future.exception()
            else:
                yield task, future.result(), None
    finally:
        client.cancel(list(pending.futures))


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _see_gpus(devices: list[int]) -> None:
    # Before CUDA starts in the worker (tasks start it): it then numbers these devices from 0.
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))


def _die_with(driver: int) -> None:
    from pipeline.lifetime import die_with_parent

    if os.getppid() == driver:
        die_with_parent(driver)
