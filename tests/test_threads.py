"""The default thread count: the free CPUs, never more threads than cores that are not busy."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline import threads


@pytest.mark.parametrize("cpus, load, now, expected", [
    (2, 0.1, 0.0, 2), (2, 1.4, 0.1, 1), (2, 7.5, 2.0, 1), (16, 3.2, 0.0, 13), (16, 40, 16.0, 1),
    # a job started seconds ago: the load average has not seen it yet, /proc/stat has
    (2, 0.4, 1.0, 1), (16, 0.2, 4.1, 12), (2, 0.3, None, 2)])
def test_default_leaves_the_busy_cores_alone(monkeypatch, cpus, load, now, expected):
    monkeypatch.setattr(threads, "available_cpus", lambda: cpus)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(threads, "busy_cpus", lambda: now)
    n, why = threads.choose_threads(None)
    assert n == expected and f"{cpus} CPUs available" in why and (": busy" in why) == (n < cpus)
    assert ("CPUs busy now" in why) == (now is not None)
    assert threads.choose_threads(3) == (3, "as set")


def test_busy_cpus_sees_a_busy_loop_on_one_of_our_cpus():
    cpu = min(os.sched_getaffinity(0))
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        time.sleep(0.3)
        busy = threads.busy_cpus(0.3)
    finally:
        loop.kill()
        loop.wait()
    assert busy is not None and 0.8 <= busy <= len(os.sched_getaffinity(0))


def test_available_cpus_is_positive_and_at_most_the_affinity():
    assert 1 <= threads.available_cpus() <= len(os.sched_getaffinity(0))
