"""The default thread count: the free CPUs, never more threads than cores that are not busy."""

from __future__ import annotations

import os

import pytest

from pipeline import threads


@pytest.mark.parametrize("cpus, load, expected", [(2, 0.1, 2), (2, 1.4, 1), (2, 7.5, 1), (16, 3.2, 13), (16, 40, 1)])
def test_default_leaves_the_busy_cores_alone(monkeypatch, cpus, load, expected):
    monkeypatch.setattr(threads, "available_cpus", lambda: cpus)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    n, why = threads.choose_threads(None)
    assert n == expected and f"{cpus} CPUs available" in why and (("busy" in why) == (n < cpus))
    assert threads.choose_threads(3) == (3, "as set")


def test_available_cpus_is_positive_and_at_most_the_affinity():
    assert 1 <= threads.available_cpus() <= len(os.sched_getaffinity(0))
