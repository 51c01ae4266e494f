"""The real AVA annotation files (``../shared/data/annotations/ava`` beside the repository, or beside the
worktrees' parent) and small hand-made ones."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AVA_REAL = next((d for d in (ROOT.parent / "shared/data/annotations/ava",
                             ROOT.parent.parent / "shared/data/annotations/ava") if d.is_dir()), None)
needs_real_ava = pytest.mark.skipif(AVA_REAL is None, reason="../shared/data/annotations/ava is not here")

LABELMAP_ID = """item {
  name: "stand"
  id: 12
}
item {
  name: "talk to (e.g., self, a person, a group)"
  id: 79
}
item {
  name: "watch (a person)"
  id: 80
}
"""
LABELMAP_LABEL_ID = LABELMAP_ID.replace("  id:", "  label_id:")
# the 2019 list (ava_action_list_v2.2_for_activitynet_2019.pbtxt): `label { ... label_type: ... }` blocks
LABELMAP_2019 = LABELMAP_LABEL_ID.replace("item {", "label {").replace("\n}", "\n  label_type: PERSON_MOVEMENT\n}")


def real(name: str) -> Path:
    return AVA_REAL / name


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def csv_rows(rows) -> str:
    return "".join(",".join(str(f) for f in r) + "\n" for r in rows)


class RandomMaps:
    """An in-memory ``MapSource``: one random (C, H, W) map and (C, T) context per keyframe id, each
    replaceable (:meth:`changed`)."""

    feature_stride = 16

    def __init__(self, rids, shape: tuple[int, int, int, int], seed: int = 0):
        self.shape = shape
        gen = _generator(seed)
        self.records = {rid: self._draw(gen) for rid in rids}

    def _draw(self, gen):
        import torch

        c, h, w, t = self.shape
        return torch.randn(c, h, w, generator=gen), torch.randn(c, t, generator=gen), (h * 16, w * 16)

    def get(self, rid):
        return self.records[rid]

    def changed(self, rid, seed: int = 9) -> "RandomMaps":
        out = RandomMaps([], self.shape)
        out.records = {**self.records, rid: self._draw(_generator(seed))}
        return out


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)
