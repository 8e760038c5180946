"""ADMM for structured pruning (Zhang et al. 2018; Ye et al. 2019), on the adversarial loss.

    min_W  L_adv(W) + rho/2 * sum_l ||W_l - Z_l + U_l||^2
    Z_l = Proj_S(W_l + U_l),   U_l += W_l - Z_l,   rho *= multiplier (capped)

Z and U are functions of the weights only, so every process that holds the same
weights computes the same Z and U.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rapc.config import AdmmConfig
from rapc.pipeline.projection import Projector


# A hard prune that costs more validation robust accuracy than this cut weights that ADMM had not
# yet moved to its sparse set: retraining then starts from a damaged model (seen at 1/16 kept
# after 3 ADMM epochs on mnist5k: 44.7% -> 15.3%, and 19.7% under the ensemble at the end).
HARD_PRUNE_LOSS = 0.15


def unconverged(admm_end: Mapping[str, Any], pruned: Mapping[str, Any]) -> str | None:
    """A warning when the hard prune lost more than HARD_PRUNE_LOSS of validation robust accuracy
    (``admm_end``: the ADMM stage's last epoch record; ``pruned``: the hard prune's)."""
    lost = admm_end["val_robust"] - pruned["val_robust"]
    if lost <= HARD_PRUNE_LOSS:
        return None
    layer, residual = max(admm_end["residuals"].items(), key=lambda item: item[1])
    return (f"the hard prune cost {lost * 100:.0f} points of validation {pruned['val_attack']} accuracy "
            f"({admm_end['val_robust']:.1%} -> {pruned['val_robust']:.1%}): ADMM had not converged "
            f"(||W - Z|| / ||W|| {residual:.2f} at {layer} after its last epoch); give it more admm epochs or a larger admm.rho")


@dataclass
class AdmmState:
    z: dict[str, torch.Tensor]
    u: dict[str, torch.Tensor]
    rho: float
    updates: int = 0

    @classmethod
    @torch.no_grad()
    def start(cls, weights: Mapping[str, torch.Tensor], projector: Projector, rho: float) -> AdmmState:
        """Z = Proj(W), U = 0."""
        current = {name: weights[name].detach() for name in projector.targets}
        masks = projector.masks(current)
        return cls({n: w * masks[n] for n, w in current.items()}, {n: torch.zeros_like(w) for n, w in current.items()}, rho)

    def penalty(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """rho/2 * sum ||W - Z + U||^2, differentiable in W."""
        total = sum((weights[n] - self.z[n] + self.u[n]).pow(2).sum() for n in self.z)
        return 0.5 * self.rho * total

    @torch.no_grad()
    def update(self, weights: Mapping[str, torch.Tensor], projector: Projector, cfg: AdmmConfig) -> None:
        shifted = {n: weights[n].detach() + self.u[n] for n in self.z}
        masks = projector.masks(shifted)
        for n, value in shifted.items():
            self.z[n] = value * masks[n]
            self.u[n] = self.u[n] + weights[n].detach() - self.z[n]
        self.rho = min(self.rho * cfg.rho_multiplier, cfg.rho_max)
        self.updates += 1

    @torch.no_grad()
    def residuals(self, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Primal residual ||W - Z|| / ||W|| per layer: how far each weight is from its sparse set."""
        values = torch.stack([(weights[n] - self.z[n]).norm() / weights[n].norm().clamp_min(1e-12) for n in self.z])
        return dict(zip((n.removesuffix(".weight") for n in self.z), values.tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"z": self.z, "u": self.u, "rho": self.rho, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Z and U go to the device of the tensors they replace (checkpoints load on the CPU)."""
        self.z = {n: state["z"][n].to(z.device) for n, z in self.z.items()}
        self.u = {n: state["u"][n].to(u.device) for n, u in self.u.items()}
        self.rho, self.updates = float(state["rho"]), int(state["updates"])


@dataclass
class AdmmSchedule:
    """ADMM during its stage: the penalty at every step, a Z/U update every ``update_every`` steps
    or epochs. The step and epoch counts are state too: a resumed stage must update when an
    uninterrupted one would."""

    weights: Mapping[str, torch.Tensor]
    projector: Projector
    cfg: AdmmConfig
    state: AdmmState
    steps: int = 0
    epochs: int = 0
    # Called with the state after it is made and after every update: under torchrun, a check
    # that every rank computed the same Z and U.
    check: Callable[[AdmmState], None] | None = None

    @classmethod
    def start(
        cls, weights: Mapping[str, torch.Tensor], projector: Projector, cfg: AdmmConfig, check: Callable[[AdmmState], None] | None = None,
    ) -> AdmmSchedule:
        schedule = cls(weights, projector, cfg, AdmmState.start(weights, projector, cfg.rho), check=check)
        schedule._checked()
        return schedule

    def _update(self) -> None:
        self.state.update(self.weights, self.projector, self.cfg)
        self._checked()

    def _checked(self) -> None:
        if self.check is not None:
            self.check(self.state)

    def penalty(self) -> torch.Tensor:
        return self.state.penalty(self.weights)

    def after_step(self) -> None:
        self.steps += 1
        if self.cfg.update_unit == "step" and self.steps % self.cfg.update_every == 0:
            self._update()

    def after_epoch(self) -> dict[str, Any]:
        """Update at the epoch's end if due; the figures for the epoch's metrics record."""
        self.epochs += 1
        if self.cfg.update_unit == "epoch" and self.epochs % self.cfg.update_every == 0:
            self._update()
        return {"rho": self.state.rho, "admm_updates": self.state.updates, "residuals": self.state.residuals(self.weights)}

    def state_dict(self) -> dict[str, Any]:
        return {"admm": self.state.state_dict(), "steps": self.steps, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state["admm"])
        self.steps, self.epochs = int(state["steps"]), int(state["epochs"])
