"""What a stage checkpoint holds, so that a resumed stage goes on exactly as an uninterrupted
one would: the weights, optimizer, LR schedule and GradScaler, the stage's own state (ADMM's
Z, U and rho; the retraining masks), the best epoch so far, the position (finished epochs; the
steps, running sums and metrics record of an epoch in progress) and every random generator
training draws from.

Python's ``random`` and numpy are seeded at the start of a run but draw nothing during
training, so they are not saved.

Under torchrun every rank takes part in a save, and rank 0 writes what they gathered: each
rank's global generators (their attacks draw different random starts) and the running sums of
an epoch in progress, summed over ranks. A resumed rank takes its own generators back; rank 0
continues the summed figures and the others start theirs from zero at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from rapc.pipeline.adversary import PerturbationStore
from rapc.pipeline.distributed import Ranks
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
    rng: list[dict[str, Any]] | None = None  # every saving rank's generator states, from a checkpoint, until restored
    ranks: Ranks = field(default_factory=Ranks)
    store: PerturbationStore | None = None  # carried perturbations, shared by the run's stages

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
        """The checkpoint of the stage; every rank must call it at the same point (it gathers from all)."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        generators = self.ranks.gather({"torch": torch.get_rng_state(), "cuda": cuda})
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "guard_best": self.guard.best if self.guard is not None else None,
            "extra": self.extra.state_dict() if self.extra is not None else None,
            "epoch": self.epoch,
            "totals": self.totals.summed(self.ranks.all_sum).state_dict() if self.totals is not None else None,
            "record": self.record,
            "epoch_start": self.epoch_start,
            "best_score": self.best_score,
            "best_model": self.best_model,
            "complete": self.complete,
            "rng": {"ranks": generators, "shuffle": self.shuffle},
            "store": self.store.state_dict() if self.store is not None else None,
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
        if self.store is not None and state.get("store") is not None:  # a checkpoint from before carrying has none
            self.store.load_state_dict(state["store"])
        self.epoch, self.record, self.epoch_start = state["epoch"], state["record"], state["epoch_start"]
        self.totals = self._resumed_totals(state["totals"]) if state["totals"] is not None else None
        self.best_score, self.best_model, self.complete = state["best_score"], state["best_model"], state["complete"]
        self.shuffle, self.rng = state["rng"]["shuffle"], list(state["rng"]["ranks"])

    def _resumed_totals(self, saved: dict[str, Any]) -> EpochTotals:
        """The epoch in progress as this rank goes on with it: the saved sums are those of all ranks,
        counted once on rank 0; the others start from zero at the same step."""
        totals = EpochTotals.from_state_dict(saved, self.device)
        return totals if self.ranks.is_main else replace(EpochTotals.zeros(self.device), steps=totals.steps)

    def restore_rng(self, seed: int) -> None:
        """Put this rank's global generators back where the loaded checkpoint left them (once).

        A rank the checkpoint holds none for (written by fewer processes than resume it) is seeded
        with ``seed + rank``, as ranks are at the start of a run: deterministic, though not the draws
        an uninterrupted run would have made (nor can they be, with another number of processes).
        """
        if self.rng is None:
            return
        if self.ranks.rank >= len(self.rng):
            torch.manual_seed(seed + self.ranks.rank)
        else:
            saved = self.rng[self.ranks.rank]
            torch.set_rng_state(saved["torch"])
            if saved["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(saved["cuda"], self.device)
        self.rng = None
