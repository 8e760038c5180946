"""Distillation from the robust dense parent during ADMM and masked retraining.

The student is trained on its own adversarial examples (the loop's inputs); the frozen
dense teacher's soft labels on those same inputs add what the hard labels cannot say:
how the robust parent spreads its confidence near the decision boundary. The term is
weight * T^2 * KL(teacher || student) at temperature T (T^2 keeps its gradient's scale
independent of T, as in Hinton et al.).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rapc.config import DistillConfig

LossTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def distillation(teacher: nn.Module, cfg: DistillConfig) -> LossTerm | None:
    """The loop's ``Hooks.loss`` term for ``teacher`` (kept in eval mode, run without gradients), or None when off."""
    if cfg.weight == 0:
        return None
    teacher.eval()
    temperature = cfg.temperature

    def term(inputs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(inputs).float() / temperature, dim=1)
        student = F.log_softmax(logits.float() / temperature, dim=1)
        return cfg.weight * temperature**2 * F.kl_div(student, target, log_target=True, reduction="batchmean")

    return term
