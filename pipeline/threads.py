"""How many intra-op threads a CPU stage should use when the user did not say.

Measured on a shared 2-core machine (localize, demo model): torch's default (one thread per core)
took 24-46 s per epoch while other processes kept the cores busy, one thread 3.3-3.8 s: threads that
spin-wait for a core that another process holds stall every step. So the default is the cores this
process may use (affinity, cgroup quota, at most the physical cores) less the load the other
processes already put on them, and at least one. The load is the larger of the 1-minute load average
and what a short look at /proc/stat sees busy right now: the average takes a minute to notice a job
that just started (a busy loop pinned to one core, started 2 s before: load average 0.4, busy now 1.0).
No torch here: the caller applies the number.
"""

from __future__ import annotations

import os
import time
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


def _cpu_times() -> dict[int, tuple[int, int]]:
    """{cpu: (busy, total)} jiffies of /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *fields = line.split()
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times


def busy_cpus(seconds: float = 0.2) -> float | None:
    """How many of this process's CPUs other processes keep busy now (this one sleeps while it looks):
    the busy share of each over ``seconds``, summed; None where /proc/stat cannot be read."""
    try:
        mine = os.sched_getaffinity(0)
        before = _cpu_times()
        time.sleep(seconds)
        after = _cpu_times()
    except (OSError, AttributeError, ValueError):
        return None
    busy = 0.0
    for cpu in mine & before.keys() & after.keys():
        d_busy, d_total = (a - b for a, b in zip(after[cpu], before[cpu]))
        busy += d_busy / d_total if d_total > 0 else 0.0
    return busy


def choose_threads(requested: int | None) -> tuple[int, str]:
    """(threads, why) for a ``threads`` runtime value: a number (>= 1, the schema's) is kept; null gives
    the available CPUs less the busy ones (the larger of the load average and the CPUs busy now,
    rounded), at least 1."""
    if requested is not None:
        return int(requested), "as set"
    cpus = available_cpus()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    now = busy_cpus()
    seen = [x for x in (load, now) if x is not None]
    if not seen:
        return cpus, f"{cpus} CPUs available"
    n = max(1, min(cpus, cpus - round(max(seen))))
    said = ", ".join(([f"load average {load:.1f}"] if load is not None else [])
                     + ([f"{now:.1f} CPUs busy now"] if now is not None else []))
    return n, f"{cpus} CPUs available, {said}" + (": busy" if n < cpus else "")
