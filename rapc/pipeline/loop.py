"""The one training loop. Dense training, ADMM and masked retraining differ only by
a loss term and hooks around the optimizer step, never by a copy of this loop.

No host-device synchronisation per step: running sums stay on the device and are
read a few times per epoch for the progress bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rapc.attacks import perturb
from rapc.config import AttackConfig, OptimizerConfig, ScheduleConfig
from rapc.progress import Reporter, SilentReporter

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Hooks:  # frozen: the shared default Hooks() cannot be changed by a caller
    penalty: Callable[[], torch.Tensor] | None = None  # added to the loss (ADMM's proximal term)
    before_step: Callable[[], None] | None = None  # e.g. mask gradients
    after_step: Callable[[], None] | None = None  # e.g. re-apply masks, step-wise ADMM updates


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
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    *,
    attack: AttackConfig | None,
    device: torch.device,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    hooks: Hooks = Hooks(),
    reporter: Reporter = SilentReporter(),
) -> dict[str, float]:
    """One epoch of (adversarial) training; returns mean loss and accuracy on the inputs trained on."""
    model.train()
    dtype = AUTOCAST[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    # Read the running figures back about ten times an epoch (every 20 steps for unsized data).
    refresh = max(1, len(data) // 10) if hasattr(data, "__len__") else 20  # type: ignore[arg-type]
    for step, (x, y) in enumerate(data):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        inputs = perturb(model, x, y, attack, dtype) if attack is not None else x
        with autocast:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), y)
        objective = loss + hooks.penalty() if hooks.penalty is not None else loss
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
        schedule.step()
        if hooks.after_step is not None:
            hooks.after_step()
        loss_sum += loss.detach() * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.numel()
        live = {"loss": float(loss_sum) / seen, "acc": float(correct) / seen} if step % refresh == refresh - 1 else None
        reporter.advance(live)
    return {"loss": float(loss_sum) / max(seen, 1), "train_acc": float(correct) / max(seen, 1)}
