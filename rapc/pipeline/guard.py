"""Catastrophic-overfitting guard for fast adversarial training (Wong et al., ICLR 2020).

FGSM training can suddenly stop producing robustness: FGSM accuracy climbs while
PGD accuracy collapses within an epoch. A PGD check on one fixed training batch
after every epoch sees it; the stage then stops with the previous epoch's weights
or flags the run.

It can also overfit from the start, so that PGD accuracy never rises and has no peak
to fall from (FGSM-RS at eps 0.3 on MNIST: 75-85% of the training batches held
against FGSM, under 10% against PGD, measured by benchmarks/time_to_robustness.py).
So at full eps a PGD accuracy far below the epoch's FGSM training accuracy is
flagged too: the same signature, seen without a history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rapc.attacks import robust_correct
from rapc.config import AttackConfig


# Healthy FGSM-RS training holds PGD within some 10-30 points of FGSM; an overfit model 60-80 points below.
FGSM_GAP = 0.5


@dataclass
class OverfitGuard:
    batch: tuple[torch.Tensor, torch.Tensor]
    attack: AttackConfig  # a PGD attack
    drop: float  # a fall of PGD accuracy below the best seen by more than this is a collapse
    best: float | None = None

    def check(self, model: nn.Module, fgsm_accuracy: float | None = None) -> tuple[float, bool]:
        """PGD accuracy on the batch, and whether it collapsed: fell by more than ``drop`` from the
        best seen, or (given the epoch's FGSM training accuracy at full eps) lies more than
        FGSM_GAP below it."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        x, y = (t.to(device) for t in self.batch)
        accuracy = float(robust_correct(model, x, y, self.attack).float().mean())
        model.train(was_training)
        collapsed = (self.best is not None and accuracy < self.best - self.drop) or (
            fgsm_accuracy is not None and accuracy < fgsm_accuracy - FGSM_GAP)
        self.best = accuracy if self.best is None else max(self.best, accuracy)
        return accuracy, collapsed
