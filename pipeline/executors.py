"""Running independent tasks in parallel through joblib: local processes, or Ray / Dask clusters.

joblib's ``parallel_config`` picks the back-end, so the same call runs on one machine or a cluster
and nothing here schedules work itself. Results come back in the order of ``tasks``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from pipeline.errors import ConfigError

BACKENDS = ("local", "ray", "dask")


def parallel_map(fn: Callable[[Any], Any], tasks: Iterable[Any], *, backend: str = "local",
                 workers: int = 1) -> list:
    """``[fn(t) for t in tasks]`` on ``workers`` workers of ``backend`` (ordered results).

    ``local`` uses joblib's loky processes; ``ray`` registers Ray's joblib back-end (a running
    cluster or a local one); ``dask`` uses the current ``dask.distributed`` client.
    """
    from joblib import Parallel, delayed, parallel_config

    tasks = list(tasks)
    if not tasks:
        return []
    if workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    joblib_backend = _joblib_backend(backend)
    with parallel_config(backend=joblib_backend, n_jobs=min(workers, len(tasks))):
        return Parallel()(delayed(fn)(task) for task in tasks)


def _joblib_backend(backend: str) -> str:
    if backend == "local":
        return "loky"
    if backend == "ray":
        try:
            from ray.util.joblib import register_ray
        except ImportError:
            raise ConfigError("--backend ray: Ray is not installed (pip install 'ray[default]')") from None
        register_ray()
        return "ray"
    if backend == "dask":
        try:
            import distributed  # noqa: F401  (joblib's dask back-end needs it)
        except ImportError:
            raise ConfigError("--backend dask: dask.distributed is not installed "
                              "(pip install 'dask[distributed]')") from None
        return "dask"
    raise ConfigError(f"--backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
