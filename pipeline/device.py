"""The torch device a stage runs on, from its ``device`` runtime value (auto | cpu | cuda | cuda:N), and
its CPU threads (``threads``): one rule for every domain."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from pipeline.errors import ConfigError


def torch_device(wanted: str, param: str):
    """``auto``: CUDA when available, else CPU. ``param`` names the setting in the error."""
    import torch

    wanted = str(wanted)
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{param}: {wanted} requested but CUDA is not available")
    try:
        return torch.device(wanted)
    except RuntimeError:
        raise ConfigError(f"{param}: expected auto, cpu, cuda or cuda:N, got {wanted!r}") from None


def stage_device(stage: str, runtime: Mapping[str, Any], log: Callable[[str], None] = print):
    """The device of a training or evaluation stage; on CPU also its torch threads, logged: on a busy CPU,
    threads spinning for a held core stall every step (``pipeline.threads.choose_threads``)."""
    import torch

    from pipeline.threads import choose_threads

    device = torch_device(runtime.get("device", "auto"), f"{stage}.device")
    if device.type == "cpu":
        threads, why = choose_threads(runtime.get("threads"))
        torch.set_num_threads(threads)
        log(f"{stage}: {threads} torch thread{'s' if threads > 1 else ''} ({why})")
    return device
