"""ADMM for structured pruning (Zhang et al. 2018; Ye et al. 2019), on the adversarial loss.

    min_W  L_adv(W) + rho/2 * sum_l ||W_l - Z_l + U_l||^2
    Z_l = Proj_S(W_l + U_l),   U_l += W_l - Z_l,   rho *= multiplier (capped)

Z and U are functions of the weights only, so every process that holds the same
weights computes the same Z and U.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rapc.config import AdmmConfig
from rapc.pipeline.projection import Projector


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

    def state_dict(self) -> dict:
        return {"z": self.z, "u": self.u, "rho": self.rho, "updates": self.updates}

    @classmethod
    def from_state_dict(cls, state: dict) -> AdmmState:
        return cls(state["z"], state["u"], float(state["rho"]), int(state["updates"]))
