"""State dicts with the public key names and shapes of a reference layout (tests/fixtures/*.json, copied
from ../shared/reference/checkpoint_layouts), filled with seeded random values."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"


def layout(name: str) -> dict[str, list[int]]:
    """key -> shape of a layout file, in the reference model's state_dict order."""
    return {k: shape for k, (shape, _dtype) in json.loads((FIXTURES / name).read_text())["keys"].items()}


def public_state_dict(name: str, *, counters: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values in the layout's names and shapes. ``counters=False`` leaves out BatchNorm's
    ``num_batches_tracked``, as files saved before PyTorch 0.4.1 (the 2018 I3D ones) do. Running
    variances are positive so loaded models give finite outputs."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout(name).items():
        if key.endswith("num_batches_tracked"):
            if counters:
                out[key] = torch.tensor(100)
            continue
        value = torch.randn(shape, generator=gen)
        out[key] = value.abs().add_(0.5) if key.endswith("running_var") else value
    return out
