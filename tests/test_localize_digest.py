"""The plain ActionFormer's training, pinned: a few steps' losses and the trained weights' outputs equal
the digest stored before training moved onto pipeline/trainer.py (regenerate only for an intended
change of the plain model: ``PYTHONPATH=$PWD python tests/test_localize_digest.py``)."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from localize_synthetic import CLASSES, DIM, make_videos
from localizers.actionformer import collate
from localizers.config import PRESETS
from localizers.data import ArraySource
from localizers.train import fit

DIGEST = Path(__file__).parent / "fixtures" / "localize_digest.json"


def run_digest(out_dir: Path) -> dict:
    from localize_synthetic import items_of

    videos = make_videos(6, 5, length=(40, 70))
    cfg = PRESETS["demo"].with_dims(DIM, len(CLASSES))
    cfg = replace(cfg, model=replace(cfg.model, embed_dim=16, drop_path=0.1),
                  train=replace(cfg.train, epochs=2, warmup_epochs=1, batch_size=2))
    source = ArraySource({vid: f for vid, (f, _) in videos.items()})
    result = fit(cfg, items_of(videos), source, out_dir, log=lambda m: None)
    with open(out_dir / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    feats = torch.from_numpy(next(iter(videos.values()))[0])
    x, mask = collate([feats], cfg.model, training=False)
    digest = {"loss": [float(r["loss"]) for r in rows], "cls_loss": [float(r["cls_loss"]) for r in rows]}
    for name, model in (("model", result.model), ("ema", result.ema)):
        with torch.no_grad():
            out = model.eval()(x, mask)
        digest[name] = [float(out.logits.double().sum()), float(out.logits.double().abs().sum()),
                        float(out.offsets.double().sum())]
    return digest


@pytest.mark.usefixtures("one_thread")
def test_plain_model_digest_unchanged(tmp_path):
    stored = json.loads(DIGEST.read_text())
    now = run_digest(tmp_path)
    for key, values in stored.items():
        assert now[key] == pytest.approx(values, rel=1e-5, abs=1e-6), key


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        DIGEST.write_text(json.dumps(run_digest(Path(d)), indent=1) + "\n")
