"""What every benchmark prints beside its figures: the CPU model (speed-ups differ between CPUs)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_summary() -> str:
    """The model, the CPUs this process may use and whether AMX is there (bf16 GEMMs several times faster)."""
    try:
        amx = "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        amx = False
    return f"{cpu_model()} ({len(os.sched_getaffinity(0))} CPUs, {'with' if amx else 'no'} AMX)"
