"""What a stage checkpoint holds, so that a resumed stage goes on exactly as an uninterrupted
one would: the weights, optimizer, LR schedule and GradScaler, the stage's own state (ADMM's
Z, U and rho; the retraining masks), the best epoch so far, the position (finished epochs; the
steps, running sums and metrics record of an epoch in progress) and every random generator
training draws from.

Python's ``random`` and numpy are seeded at the start of a run but draw nothing during
training, so they are not saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from rapc.pipeline.guard import OverfitGuard
from rapc.pipeline.loop import EpochTotals, NonFinite


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_finite(model: nn.Module) -> None:
    """Raise NonFinite if any weight or buffer holds a NaN or an infinity (one host-device sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise NonFinite("the weights became non-finite")


@dataclass
class StageState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    guard: OverfitGuard | None
    extra: Stateful | None  # what the stage adds: ADMM's schedule, the retraining masks
    shuffle: torch.Tensor  # the shuffle generator's state at the start of epoch ``epoch + 1``
    epoch: int = 0  # epochs finished
    totals: EpochTotals | None = None  # the epoch in progress, when a checkpoint fell inside it
    record: dict[str, Any] | None = None  # its metrics record so far (epoch-start lr, eps)
    epoch_start: dict[str, torch.Tensor] | None = None  # its starting weights, for the guard's rollback
    best_score: float = -1.0
    best_model: dict[str, torch.Tensor] | None = None
    complete: bool = False
    rng: dict[str, Any] | None = None  # generator states loaded from a checkpoint, until restored

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def finish_epoch(self, epoch: int, shuffle: torch.Tensor) -> None:
        self.epoch, self.shuffle = epoch, shuffle
        self.totals = self.record = self.epoch_start = None

    def describe(self) -> str:
        if self.complete:
            return "complete, loaded from its checkpoint"
        if self.totals is not None:
            return f"resuming epoch {self.epoch + 1} at step {self.totals.steps}"
        return f"resuming after epoch {self.epoch}"

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "guard_best": self.guard.best if self.guard is not None else None,
            "extra": self.extra.state_dict() if self.extra is not None else None,
            "epoch": self.epoch,
            "totals": self.totals.state_dict() if self.totals is not None else None,
            "record": self.record,
            "epoch_start": self.epoch_start,
            "best_score": self.best_score,
            "best_model": self.best_model,
            "complete": self.complete,
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda, "shuffle": self.shuffle},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Everything but the global generators, which ``restore_rng`` sets when training draws again."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.guard is not None:
            self.guard.best = state["guard_best"]
        if self.extra is not None:
            self.extra.load_state_dict(state["extra"])
        self.epoch, self.record, self.epoch_start = state["epoch"], state["record"], state["epoch_start"]
        self.totals = EpochTotals.from_state_dict(state["totals"], self.device) if state["totals"] is not None else None
        self.best_score, self.best_model, self.complete = state["best_score"], state["best_model"], state["complete"]
        self.shuffle, self.rng = state["rng"]["shuffle"], state["rng"]

    def restore_rng(self) -> None:
        """Put the global generators back where the loaded checkpoint left them (once)."""
        if self.rng is None:
            return
        torch.set_rng_state(self.rng["torch"])
        if self.rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(self.rng["cuda"], self.device)
        self.rng = None
