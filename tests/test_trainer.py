"""pipeline/trainer.py on a toy regression: hooks (EMA, CSV, validation, early stop), resume equal to an
uninterrupted run, a checkpoint of another identity refused; the localizer's validation through its stage."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import torch
from torch import nn

from localize_synthetic import finish, make_videos, stage_context, write_dataset
from localizers import stage
from pipeline.trainer import EMA, Accumulated, CsvLog, EarlyStop, Trainer, Validate


def toy(out_dir, hooks_of, identity="a", log=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))  # dropout: RNG state matters
    w = torch.randn(4, 1)

    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(5):
            x = torch.randn(16, 4, generator=g)
            yield x, x @ w

    def step(net, b):
        mse = ((net(b[0]) - b[1]) ** 2).mean()
        return {"loss": mse, "mse_loss": mse}

    hooks = hooks_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = Trainer(model, opt, step, out_dir=out_dir, schedule=lambda s: 1.0 / (1 + 0.01 * s), clip_grad=5.0,
                      hooks=hooks, identity=identity, name="toy", log=log or (lambda m: None))
    return trainer, batches


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_loss_falls_and_hooks_log(tmp_path):
    messages = []
    trainer, batches = toy(tmp_path, lambda m: [EMA(m, 0.9), CsvLog(tmp_path / "log.csv")], log=messages.append)
    assert trainer.fit(batches, 5, 6) == 6 and trainer.step == 30
    log = rows(tmp_path / "log.csv")
    assert [int(r["epoch"]) for r in log] == list(range(1, 7)) and float(log[-1]["loss"]) < 0.5 * float(log[0]["loss"])
    assert log[0]["loss"] == log[0]["mse_loss"] and "toy: epoch 6/6 loss" in messages[-1] and "(mse " in messages[-1]
    ema = trainer.hooks[0].model
    assert not torch.equal(ema[0].weight, trainer.model[0].weight)


def test_an_accumulated_step_takes_the_whole_batchs_gradient(tmp_path):
    """The parts of an Accumulated batch, backpropagated one at a time and scaled by ``finish()``, make one
    optimizer step with the batch's gradient and log the batch's loss."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g), torch.randn(12, 1, generator=g)

    def train(out_dir, batch):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)

        def step(net, b):  # b[2]: the normaliser (1 in a part: the sum, scaled once every part is in)
            sse = ((net(b[0]) - b[1]) ** 2).sum() * b[2]
            return {"loss": sse, "sse_loss": sse}

        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), step, out_dir=out_dir,
                          hooks=[CsvLog(out_dir / "log.csv")])
        trainer.fit(lambda epoch: [batch], 1, 1)
        return trainer, model

    whole, ref = train(tmp_path / "whole", (x, y, 1 / 12))
    parts, acc = train(tmp_path / "parts", Accumulated([(x[:5], y[:5], 1.0), (x[5:], y[5:], 1.0)], lambda: 1 / 12))
    assert parts.step == whole.step == 1
    torch.manual_seed(0)
    assert not torch.equal(ref.weight, nn.Linear(4, 1).weight)  # it did move
    for a, b in zip(acc.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    (logged,), (expected,) = rows(tmp_path / "parts" / "log.csv"), rows(tmp_path / "whole" / "log.csv")
    assert float(logged["loss"]) == pytest.approx(float(expected["loss"]))


def test_validation_and_early_stop(tmp_path):
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.9])
    messages = []
    hooks = lambda m: [Validate(lambda t: next(scores), every=2, key="val_x"), EarlyStop("val_x", patience=2),
                       CsvLog(tmp_path / "log.csv")]
    trainer, batches = toy(tmp_path, hooks, log=messages.append)
    # validations after epochs 2, 4, 6, 8: 0.5, 0.6, 0.55, 0.58 -> two without gain: stop after epoch 8
    assert trainer.fit(batches, 5, 20) == 8 and trainer.stop
    log = rows(tmp_path / "log.csv")
    assert [r["val_x"] for r in log] == ["", "0.5", "", "0.6", "", "0.55", "", "0.58"]
    assert any("early stop after epoch 8: val_x 0.5800, best 0.6000" in m for m in messages)
    # the stop is part of the checkpoint: a rerun does nothing more
    again, batches = toy(tmp_path, hooks)
    assert again.fit(batches, 5, 20) == 0


def test_resume_equals_uninterrupted_and_identity_is_checked(tmp_path):
    whole, batches = toy(tmp_path / "a", lambda m: [EMA(m, 0.9), CsvLog(tmp_path / "a" / "log.csv")])
    whole.fit(batches, 5, 4)
    first, batches = toy(tmp_path / "b", lambda m: [EMA(m, 0.9), CsvLog(tmp_path / "b" / "log.csv")])
    assert first.fit(batches, 5, 4, max_epochs=2) == 2
    with open(tmp_path / "b" / "log.csv", "a") as f:  # an epoch logged but never checkpointed
        f.write("3,15,0.1,9.9,9.9,0.1\n")
    messages = []
    resumed, batches = toy(tmp_path / "b", lambda m: [EMA(m, 0.9), CsvLog(tmp_path / "b" / "log.csv")],
                           log=messages.append)
    assert resumed.fit(batches, 5, 4) == 2 and messages[0] == "toy: resuming after epoch 2/4"
    for a, b in ((whole.model, resumed.model), (whole.hooks[0].model, resumed.hooks[0].model)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    la, lb = rows(tmp_path / "a" / "log.csv"), rows(tmp_path / "b" / "log.csv")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    other, batches = toy(tmp_path / "b", lambda m: [], identity="b")
    with pytest.raises(ValueError, match="another configuration"):
        other.fit(batches, 5, 4)


def test_localize_validates_on_the_val_split(tmp_path):
    ds, extract_dir = write_dataset(tmp_path, make_videos(6, 0, length=(60, 90)), make_videos(2, 1, length=(60, 90)))
    params = {"preset": "demo", "epochs": 2, "warmup_epochs": 0, "embed_dim": 16, "val_every": 1}
    ctx = stage_context(tmp_path, "localize", "L1", params, ds, {"extract": extract_dir})
    with pytest.raises(Exception, match="no 'val' split"):
        stage.train(ctx)
    ds = replace(ds, splits={"train": "validation", "val": "test"})
    ctx = stage_context(tmp_path, "localize", "L2", params, ds, {"extract": extract_dir})
    stage.train(ctx)
    log = rows(finish(ctx) / "train_log.csv")
    assert [0.0 <= float(r["val_mAP"]) <= 1.0 for r in log] == [True, True]
    # two processes: the val split's items and reader travel to them, process 0 validates
    ctx = stage_context(tmp_path, "localize", "L3", {**params, "batch_size": 2}, ds,
                        {"extract": extract_dir})
    ctx.runtime["nproc"] = 2
    stage.train(ctx)
    log = rows(finish(ctx) / "train_log.csv")
    assert [0.0 <= float(r["val_mAP"]) <= 1.0 for r in log] == [True, True]


def _shared_toy(out_dir, world: int, rank: int, scores):
    """A linear regression whose ``step`` returns this process's share of the batch's loss (the squared
    errors of its slice over the whole batch's size), validated every epoch by ``scores``."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    w = torch.randn(4, 1)
    calls = []

    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(4):
            x = torch.randn(8, 4, generator=g)
            yield x.chunk(world)[rank], (x @ w).chunk(world)[rank]

    def step(net, b):
        return {"loss": ((net(b[0]) - b[1]) ** 2).sum() / 8}

    def metric(trainer):
        calls.append(trainer.epoch)
        return scores[trainer.epoch - 1]

    hooks = [Validate(metric, every=1, key="val_x"), EarlyStop("val_x", patience=1), CsvLog(out_dir / "log.csv")]
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), step, out_dir=out_dir, hooks=hooks,
                      log=lambda m: None)
    return trainer, batches, calls


SCORES = [0.5, 0.7, 0.6, 0.9]  # no gain at epoch 3: stop after it


def _toy_rank(out_dir):
    from torch import distributed as dist

    dist.init_process_group("gloo")
    try:
        trainer, batches, calls = _shared_toy(out_dir, dist.get_world_size(), dist.get_rank(), SCORES)
        trainer.fit(batches, 4, 10)
        return trainer.epoch, calls, {k: v.clone() for k, v in trainer.model.state_dict().items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_thread")
def test_two_processes_train_as_one_validate_on_process_0_and_stop_together(tmp_path):
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    one, batches, calls = _shared_toy(tmp_path / "one", 1, 0, SCORES)
    one.fit(batches, 4, 10)
    assert one.epoch == 3 and calls == [1, 2, 3]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id="trainer-test", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    results = elastic_launch(config, _toy_rank)(tmp_path / "two")
    (epochs0, calls0, state0), (epochs1, calls1, state1) = results[0], results[1]
    assert epochs0 == epochs1 == 3 and calls0 == [1, 2, 3] and calls1 == []  # process 1 never validates
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(state0[k], v, rtol=1e-6, atol=1e-6)
        assert torch.equal(state0[k], state1[k])
    a, b = rows(tmp_path / "one" / "log.csv"), rows(tmp_path / "two" / "log.csv")  # written once, by process 0
    assert [r["val_x"] for r in b] == ["0.5", "0.7", "0.6"]
    assert [float(r["loss"]) for r in b] == pytest.approx([float(r["loss"]) for r in a], rel=1e-6)


def test_divergence_is_said_once(tmp_path):
    messages = []
    trainer, batches = toy(tmp_path / "a", lambda m: [], log=messages.append)
    trainer.fit(batches, 5, 8)
    assert not any("diverged" in m for m in messages)  # a loss that falls says nothing
    messages.clear()
    trainer, batches = toy(tmp_path / "b", lambda m: [CsvLog(tmp_path / "b" / "log.csv")], log=messages.append)
    trainer.schedule = lambda s: 1.0 if s < 15 else 200.0  # the lr jumps after 3 epochs
    trainer.fit(batches, 5, 8)
    losses = [float(r["loss"]) for r in rows(tmp_path / "b" / "log.csv")]
    warned = [m for m in messages if "diverged" in m]
    assert len(warned) == 1 and "toy.lr or toy.clip_grad" in warned[0], (losses, warned)
    assert "the loss of epoch 4 " in warned[0] and losses[3] > 10 * min(losses[:3])
