"""Catastrophic-overfitting guard for fast adversarial training (Wong et al., ICLR 2020).

FGSM training can suddenly stop producing robustness: FGSM accuracy climbs while
PGD accuracy collapses within an epoch. A PGD check on one fixed training batch
after every epoch sees it; the stage then stops with the previous epoch's weights
or flags the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rapc.attacks import robust_correct
from rapc.config import AttackConfig


@dataclass
class OverfitGuard:
    batch: tuple[torch.Tensor, torch.Tensor]
    attack: AttackConfig  # a PGD attack
    drop: float  # a fall of PGD accuracy below the best seen by more than this is a collapse
    best: float | None = None

    def check(self, model: nn.Module) -> tuple[float, bool]:
        """PGD accuracy on the batch, and whether it collapsed."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        x, y = (t.to(device) for t in self.batch)
        accuracy = float(robust_correct(model, x, y, self.attack).float().mean())
        model.train(was_training)
        collapsed = self.best is not None and accuracy < self.best - self.drop
        self.best = accuracy if self.best is None else max(self.best, accuracy)
        return accuracy, collapsed
