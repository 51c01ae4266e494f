"""One training loop for every domain's model, with hooks.

The loop itself only sets the learning rate, runs the domain's ``step`` (forward and loss), steps the
optimizer and checkpoints; everything else is a :class:`Hook` (EMA weights, CSV and TensorBoard logs,
periodic validation, early stopping, and the divergence warning every run gets). Losses are summed on the device and read once per epoch: no
per-step host sync beyond what the domain's own loss needs.

Checkpoint and resume: after every epoch ``checkpoint.pt`` is written atomically with the model, the
optimizer, the torch RNG state, every hook's and every stateful object's state and the domain's
``identity`` (its config and item list); a run finding one resumes after its epoch, and refuses one of
another identity. With epoch-seeded batches (the domain's ``batches(epoch)``) a resumed run continues
exactly as the uninterrupted run would (on CPU).

Accumulation: ``batches(epoch)`` may yield an :class:`Accumulated` step, whose parts go through ``step``
and backward one after the other (one part's graph alive at a time) before the optimizer steps once;
a domain uses it to split a batch of unequal lengths so that no part computes on padding.

Data parallelism: called in every process of a ``torch.distributed`` group, the trainer wraps the model in
DistributedDataParallel; ``batches(epoch)`` then yields this process's slice of each batch and ``step``
returns this process's share of the batch's losses (the shares sum to the batch's loss, see
:func:`all_sum`). DDP averages the gradients, so the loss is scaled by the number of processes before
the backward pass, and the logged sums are summed over the processes once per epoch. Process 0 alone
writes: the checkpoint and the hooks marked ``rank0_only`` (logs); every process loads the checkpoint.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import distributed as dist
from torch import nn

from pipeline.context import append_csv_row, save_torch_atomic
from pipeline.progress import progress

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.csv"


class Hook:
    """A training hook; every method is optional. ``name`` keys its state in the checkpoint."""

    name = ""
    rank0_only = False  # a writer: process 0 of a data-parallel group alone runs it

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass

    def resumed(self, trainer: "Trainer") -> None:
        """After a checkpoint was loaded (``trainer.epoch`` epochs are done)."""

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def after_epoch(self, trainer: "Trainer", row: dict) -> None:
        """``row``: the epoch's log values; a hook may add its own or set ``trainer.stop``."""

    def after_checkpoint(self, trainer: "Trainer", row: dict) -> None:
        """The epoch is checkpointed: write ``row`` out (a resumed run trims what it redoes)."""

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Accumulated:
    """One optimizer step over ``parts`` of a batch. Each part's losses are backpropagated as they are;
    then ``finish()`` gives the factor that the summed gradients and losses take (e.g. 1 / the batch's
    loss normaliser, known once every part has counted its positives). In a data-parallel group every
    process yields an Accumulated step at the same steps (``finish`` may use collectives)."""
    parts: Sequence[Any]
    finish: Callable[[], float] = lambda: 1.0


class Trainer:
    """``step(model, batch) -> {"loss": tensor, other named losses}``; ``schedule(step)``: the factor on
    each parameter group's initial learning rate; ``stateful``: objects with ``state_dict`` /
    ``load_state_dict`` checkpointed with the model (e.g. a running loss normaliser)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 step: Callable[[nn.Module, Any], Mapping[str, torch.Tensor]], *, out_dir: Path,
                 schedule: Callable[[int], float] = lambda step: 1.0, clip_grad: float = 0.0,
                 hooks: Sequence[Hook] = (), stateful: Mapping[str, Any] | None = None,
                 identity: Any = None, name: str = "train", log: Callable[[str], None] = print,
                 epoch_values: Callable[[], dict] | None = None):
        self.model, self.optimizer, self.step_fn = model, optimizer, step
        self.out_dir = Path(out_dir)
        self.schedule, self.clip_grad = schedule, clip_grad
        self.world, self.rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        self.hooks = [h for h in [*hooks, Divergence()] if self.rank == 0 or not h.rank0_only]
        self.stateful = dict(stateful or {})
        self.identity, self.name, self.log, self.epoch_values = identity, name, log, epoch_values
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.epoch = 0      # epochs done
        self.step = 0       # optimizer steps done
        self.stop = False   # set by a hook (early stopping)
        self.times: list[float] = []

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def resume(self, total_epochs: int) -> bool:
        """Load ``checkpoint.pt`` when there is one; False when there is none."""
        path = self.checkpoint_path
        if not path.exists():
            return False
        device = next(self.model.parameters()).device
        state = torch.load(path, map_location=device, weights_only=True)  # ours, yet no code either
        if state.get("identity") != self.identity:
            raise ValueError(f"{path}: checkpoint of another configuration or item list; remove it to retrain")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for key, obj in self.stateful.items():
            obj.load_state_dict(state["stateful"][key])
        for hook in self.hooks:
            hook.load_state_dict(state["hooks"].get(hook.name))
        torch.set_rng_state(state["rng_torch"].cpu())  # loaded onto the model's device
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        self.epoch, self.step, self.stop = state["epoch"], state["step"], state.get("stop", False)
        for hook in self.hooks:
            hook.resumed(self)
        self.log(f"{self.name}: resuming after epoch {self.epoch}/{total_epochs}")
        return True

    def save(self) -> None:
        """Write the checkpoint (process 0 of a data-parallel group: the others hold the same state)."""
        if self.rank != 0:
            return
        device = next(self.model.parameters()).device
        state = {"epoch": self.epoch, "step": self.step, "stop": self.stop, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "stateful": {k: obj.state_dict() for k, obj in self.stateful.items()},
                 "hooks": {h.name: h.state_dict() for h in self.hooks if h.name},
                 "rng_torch": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                 "identity": self.identity}
        save_torch_atomic(state, self.checkpoint_path)

    def fit(self, batches: Callable[[int], Iterable], steps_per_epoch: int, total_epochs: int,
            max_epochs: int | None = None) -> int:
        """Train epochs ``self.epoch .. total_epochs`` (or up to ``max_epochs``; the schedule is unchanged)
        from ``batches(epoch)``; returns the number of epochs run now."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume(total_epochs)
        end = total_epochs if max_epochs is None else min(total_epochs, max_epochs)
        start = self.epoch
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        net = nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        try:
            while self.epoch < end and not self.stop:
                self._epoch(net, batches(self.epoch), steps_per_epoch, total_epochs, end, params)
        finally:
            for hook in self.hooks:
                hook.close()
        self.model.eval()
        return self.epoch - start

    def _gradients(self, net: nn.Module, batch: Any, params: list) -> Mapping[str, torch.Tensor]:
        """Forward and backward of one step's batch (every part of an :class:`Accumulated` one); its losses."""
        if not isinstance(batch, Accumulated):
            return self._backward(net, batch)
        sums: dict[str, torch.Tensor] = {}
        last = len(batch.parts) - 1
        for i, part in enumerate(batch.parts):
            # DDP reduces the summed gradients once, in the last part's backward
            with net.no_sync() if self.world > 1 and i < last else nullcontext():
                losses = self._backward(net, part)
            for key, value in losses.items():
                value = value.detach()
                sums[key] = sums[key] + value if key in sums else value
        factor = batch.finish()
        if factor != 1.0:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)
            sums = {key: value * factor for key, value in sums.items()}
        return sums

    def _backward(self, net: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        losses = self.step_fn(net, batch)
        # DDP averages the processes' gradients: scaled by the processes, their shares sum to the batch's
        (losses["loss"] * self.world if self.world > 1 else losses["loss"]).backward()
        return losses

    def _epoch(self, net: nn.Module, batches: Iterable, steps: int, total: int, end: int, params: list) -> None:
        t0 = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        bar = (progress(batches, total=steps, desc=f"epoch {self.epoch + 1}/{total}", unit="step")
               if self.rank == 0 else batches)
        for batch in bar:
            factor = self.schedule(self.step)
            for g in self.optimizer.param_groups:
                g["lr"] = g["initial_lr"] * factor
            self.optimizer.zero_grad(set_to_none=True)
            losses = self._gradients(net, batch, params)
            if self.clip_grad > 0:
                nn.utils.clip_grad_norm_(params, self.clip_grad)
            self.optimizer.step()
            self.step += 1
            for hook in self.hooks:
                hook.after_step(self)
            for key, value in losses.items():  # float64 on the device: read once per epoch
                value = value.detach().double()
                sums[key] = sums[key] + value if key in sums else value
        if self.world > 1 and sums:  # one all-reduce of the epoch's sums
            sums = dict(zip(sums, all_sum(torch.stack(list(sums.values())))))
        n = max(steps, 1)
        seconds = time.perf_counter() - t0
        self.times.append(seconds)
        row = {"epoch": self.epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
               "loss": float(sums.pop("loss", torch.zeros(()))) / n,
               **{k: float(v) / n for k, v in sums.items()},
               **(self.epoch_values() if self.epoch_values else {}), "seconds": seconds}
        self.epoch += 1
        for hook in self.hooks:
            hook.after_epoch(self, row)
        self.save()
        for hook in self.hooks:
            hook.after_checkpoint(self, row)
        parts = " ".join(f"{k.removesuffix('_loss')} {row[k]:.4f}" for k in sums)
        eta = sum(self.times) / len(self.times) * (end - self.epoch)
        extra = "".join(f" {k} {row[k]:.4f}" for k in row if k.startswith("val_") and row[k] is not None)
        self.log(f"{self.name}: epoch {self.epoch}/{total} loss {row['loss']:.4f}"
                 + (f" ({parts})" if parts else "") + f" lr {row['lr']:.2e}{extra} {seconds:.1f}s"
                 + (f", eta {_duration(eta)}" if self.epoch < end and not self.stop else ""))


class EMA(Hook):
    """Exponential moving average of the weights, updated after every step (one fused lerp)."""

    name = "ema"

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._src = list(model.parameters())
        self._dst = list(self.model.parameters())

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state)

    def after_step(self, trainer: Trainer) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(self._dst, self._src, 1.0 - self.decay)


class CsvLog(Hook):
    """One row per epoch in ``path``; rows of epochs after the checkpoint (a crash between the
    checkpoint and the log) are dropped on resume."""

    rank0_only = True

    def __init__(self, path: Path):
        self.path = Path(path)

    def resumed(self, trainer: Trainer) -> None:
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if int(r["epoch"]) <= trainer.epoch]
        if len(kept) != len(rows):
            self.path.unlink()
            for r in kept:
                append_csv_row(self.path, r)

    def after_checkpoint(self, trainer: Trainer, row: dict) -> None:
        append_csv_row(self.path, row)


class TensorBoard(Hook):
    """The numeric values of every row as scalars (one event file per run); nothing without tensorboard."""

    rank0_only = True

    def __init__(self, board_dir: Path):
        self.board_dir = Path(board_dir)
        self.writer = None

    def after_checkpoint(self, trainer: Trainer, row: dict) -> None:
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.writer = False
                return
            self.writer = SummaryWriter(str(self.board_dir))
        if self.writer is False:
            return
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()  # the epoch's scalars are on disk with its checkpoint

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        self.writer = None


class Divergence(Hook):
    """Says once when an epoch's mean loss is not finite, or is above the first epoch's and ``factor``
    times the lowest so far: a run that diverged late (an lr at the edge of stability, met on some seeds
    and CPUs and not others) otherwise ends with a normal-looking log and a poor model. Above the first
    epoch's: a loss fitted close to 0 may wobble by large ratios without diverging."""

    name = "divergence"
    rank0_only = True

    def __init__(self, factor: float = 10.0):
        self.factor = factor
        self.first: float | None = None
        self.lowest: tuple[float, int] | None = None  # (loss, epoch)
        self.warned = False

    def state_dict(self):
        return {"first": self.first, "lowest": self.lowest, "warned": self.warned}

    def load_state_dict(self, state) -> None:
        if state:
            self.first, self.warned = state["first"], state["warned"]
            self.lowest = tuple(state["lowest"]) if state["lowest"] else None

    def after_epoch(self, trainer: Trainer, row: dict) -> None:
        loss = row["loss"]
        finite = math.isfinite(loss)
        if finite and self.first is None:
            self.first = loss
        if finite and (self.lowest is None or loss < self.lowest[0]):
            self.lowest = (loss, trainer.epoch)
            return
        if self.warned or (finite and (loss <= self.first or loss <= self.factor * self.lowest[0])):
            return
        self.warned = True
        since = (f" is {loss / self.lowest[0]:.0f}x the lowest so far ({self.lowest[0]:.4f} after epoch "
                 f"{self.lowest[1]})" if finite and self.lowest[0] > 0 else "")
        trainer.log(f"{trainer.name}: warning: training diverged: the loss of epoch {trainer.epoch} ({loss:.4g})"
                    f"{since}; a lower {trainer.name}.lr or {trainer.name}.clip_grad keeps it stable")


class Validate(Hook):
    """``metric(trainer)`` every ``every`` epochs, into the row as ``key`` (None on the other epochs, so
    the CSV keeps one header). In a data-parallel group process 0 computes it and sends it to the others,
    so that every process takes the same early-stop decision."""

    def __init__(self, metric: Callable[[Trainer], float], every: int, key: str = "val_metric"):
        self.metric, self.every, self.key = metric, every, key

    def after_epoch(self, trainer: Trainer, row: dict) -> None:
        if trainer.epoch % self.every:
            row[self.key] = None
            return
        value = [float(self.metric(trainer)) if trainer.rank == 0 else None]
        if trainer.world > 1:
            dist.broadcast_object_list(value, src=0)
        row[self.key] = value[0]


class EarlyStop(Hook):
    """Stop when ``key`` of the row (a Validate hook's, placed before this one) has not improved by
    ``min_delta`` for ``patience`` validations (higher is better)."""

    name = "early_stop"

    def __init__(self, key: str, patience: int, min_delta: float = 0.0):
        self.key, self.patience, self.min_delta = key, patience, min_delta
        self.best, self.bad = None, 0

    def state_dict(self):
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state) -> None:
        if state:
            self.best, self.bad = state["best"], state["bad"]

    def after_epoch(self, trainer: Trainer, row: dict) -> None:
        value = row.get(self.key)
        if value is None:
            return
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            trainer.stop = True
            trainer.log(f"{trainer.name}: early stop after epoch {trainer.epoch}: {self.key} {value:.4f}, best "
                        f"{self.best:.4f}, no better for {self.bad} validations")


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes of the data-parallel group (a new tensor)."""
    t = t.clone()
    dist.all_reduce(t)
    return t


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"

