"""The torch device a stage runs on, from its ``device`` runtime value (auto | cpu | cuda | cuda:N)."""

from __future__ import annotations

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
