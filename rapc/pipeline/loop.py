"""The one training loop. Dense training, ADMM and masked retraining differ only by
a loss term and hooks around the optimizer step, never by a copy of this loop.

No host-device synchronisation per step: running sums stay on the device and are
read a few times per epoch for the progress bar. Those read-backs are also where a
NaN or infinite loss is noticed, so catching it costs nothing extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rapc.config import AttackConfig, OptimizerConfig, ScheduleConfig
from rapc.errors import RapcError
from rapc.pipeline.adversary import PerturbationStore, adversarial_inputs
from rapc.progress import Reporter, SilentReporter

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Hooks:  # frozen: the shared default Hooks() cannot be changed by a caller
    penalty: Callable[[], torch.Tensor] | None = None  # added to the loss (ADMM's proximal term)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (inputs, logits) -> a term added to the loss (distillation)
    before_step: Callable[[], None] | None = None  # e.g. mask gradients
    after_step: Callable[[], None] | None = None  # e.g. re-apply masks, step-wise ADMM updates


@dataclass(frozen=True)
class Step:
    """One optimisation step as a stage takes it: where its inputs come from (the attack, none for
    clean epochs; the store of carried perturbations), what updates the weights, in which precision,
    and the stage's hooks. Under a ``free`` attack a batch takes ``attack.steps`` such steps."""

    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    attack: AttackConfig | None = None
    precision: str = "fp32"
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    hooks: Hooks = Hooks()
    store: PerturbationStore | None = None


class NonFinite(RapcError):
    """Training produced a NaN or infinite loss or weight: the stage stops without checkpointing it."""


@dataclass
class EpochTotals:
    """The running sums of an epoch, kept on the device; a checkpoint inside an epoch saves them,
    so a resumed epoch reports the same mean loss and accuracy as an uninterrupted one."""

    loss: torch.Tensor  # sum of per-example losses
    correct: torch.Tensor
    seen: int = 0
    steps: int = 0  # batches trained on in this epoch

    @classmethod
    def zeros(cls, device: torch.device) -> EpochTotals:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss.detach() * y.numel()
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += y.numel()
        self.steps += 1

    def read(self) -> dict[str, float]:
        """Mean loss and accuracy so far (a host-device sync); a non-finite loss raises NonFinite."""
        loss = float(self.loss) / max(self.seen, 1)
        if not math.isfinite(loss):
            raise NonFinite(f"the training loss became {loss} by step {self.steps}")
        return {"loss": loss, "acc": float(self.correct) / max(self.seen, 1)}

    def summed(self, all_sum: Callable[[torch.Tensor], torch.Tensor]) -> EpochTotals:
        """These sums added up by ``all_sum`` (over the ranks of a distributed run); ``steps`` stays per rank."""
        total = all_sum(torch.stack([self.loss.double(), self.correct.double(), torch.tensor(float(self.seen), device=self.loss.device, dtype=torch.float64)]))
        return EpochTotals(total[0].to(self.loss.dtype), total[1].long(), int(total[2]), self.steps)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "correct": self.correct, "seen": self.seen, "steps": self.steps}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> EpochTotals:
        return cls(state["loss"].to(device), state["correct"].to(device), int(state["seen"]), int(state["steps"]))


@dataclass(frozen=True)
class SavePoints:
    """Checkpoints inside an epoch: every ``every`` steps, and where ``stop`` says to stop (asked
    after each step with the epoch's step count: the first boundary after a Ctrl-C), where the
    loop then stops with KeyboardInterrupt. Between steps the weights, optimizer and random
    generators are consistent, so a resumed run is exact."""

    save: Callable[[EpochTotals], None]
    every: int | None = None
    stop: Callable[[int], bool] = lambda step: False

    def after_step(self, totals: EpochTotals) -> None:
        stop = self.stop(totals.steps)
        if stop or (self.every is not None and totals.steps % self.every == 0):
            self.save(totals)
        if stop:
            raise KeyboardInterrupt


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    optimizer = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LR factor: linear warm-up, then constant, cosine to zero, or step decay at epoch milestones."""
    total = max(1, steps_per_epoch * epochs)
    warmup = steps_per_epoch * cfg.warmup_epochs

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        if cfg.name == "step":
            return cfg.gamma ** sum(step >= m * steps_per_epoch for m in cfg.milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_epoch(
    model: nn.Module,
    data: Iterable[tuple[torch.Tensor, torch.Tensor]],
    step: Step,
    *,
    reporter: Reporter = SilentReporter(),
    totals: EpochTotals | None = None,
    save_points: SavePoints | None = None,
    reduce: Callable[[EpochTotals], EpochTotals] | None = None,
) -> dict[str, float]:
    """One epoch of (adversarial) training; returns mean loss and accuracy on the inputs trained on
    (of a batch replayed by free training, its last replay).

    ``data`` yields (images, labels) or (images, labels, dataset indices); a store needs the indices.
    ``totals`` continues an epoch that a checkpoint interrupted: ``data`` then yields only the
    batches not yet trained on. A NaN or infinite loss raises NonFinite where it is read back.
    ``reduce`` turns this process's sums into the figures returned (the sums over all ranks under
    torchrun); the live figures stay this process's own.
    """
    model.train()
    device = next(model.parameters()).device
    attack, hooks, optimizer, scaler = step.attack, step.hooks, step.optimizer, step.scaler
    dtype = AUTOCAST[step.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    totals = totals or EpochTotals.zeros(device)
    # Read the running figures back about ten times an epoch (every 20 steps for unsized data).
    refresh = max(1, len(data) // 10) if hasattr(data, "__len__") else 20  # type: ignore[arg-type]
    for x, y, *index in data:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        replays = adversarial_inputs(model, x, y, index[0] if index else None, attack, step.store, dtype) if attack is not None else (x,)
        for inputs in replays:
            with autocast:
                logits = model(inputs)
                extra = hooks.loss(inputs, logits) if hooks.loss is not None else None
            loss = F.cross_entropy(logits.float(), y)
            objective = loss + hooks.penalty() if hooks.penalty is not None else loss
            if extra is not None:
                objective = objective + extra
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(objective).backward()
            else:
                objective.backward()
            if hooks.before_step is not None:
                hooks.before_step()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step.schedule.step()
            if hooks.after_step is not None:
                hooks.after_step()
        totals.add(loss, logits, y)
        reporter.advance(totals.read() if totals.steps % refresh == 0 else None)
        if save_points is not None:
            save_points.after_step(totals)
    final = (reduce(totals) if reduce is not None else totals).read()
    return {"loss": final["loss"], "train_acc": final["acc"]}
