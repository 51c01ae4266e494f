"""How many intra-op threads a CPU stage should use when the user did not say.

Measured on a shared 2-core machine (localize, demo model): torch's default (one thread per core)
took 24-46 s per epoch while other processes kept the cores busy, one thread 3.3-3.8 s: threads that
spin-wait for a core that another process holds stall every step. So the default is the cores this
process may use (affinity, cgroup quota, at most the physical cores) less the load the other
processes already put on them (the 1-minute load average), and at least one. No torch here: the
caller applies the number.
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int | None:
    """Distinct (package, core) pairs of /proc/cpuinfo; None where it does not say."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, phys = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None


def available_cpus() -> int:
    """CPUs this process may run on: affinity, the cgroup v2 quota, and the physical cores."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    physical = physical_cores()
    return max(1, min(n, physical) if physical else n)


def choose_threads(requested: int | None) -> tuple[int, str]:
    """(threads, why) for a ``threads`` runtime value: a number (>= 1, the schema's) is kept; null gives
    the available CPUs less the busy ones (the load average, rounded), at least 1."""
    if requested is not None:
        return int(requested), "as set"
    cpus = available_cpus()
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cpus, f"{cpus} CPUs available"
    n = max(1, min(cpus, cpus - round(load)))
    busy = f", load average {load:.1f}: busy" if n < cpus else f", load average {load:.1f}"
    return n, f"{cpus} CPUs available{busy}"
