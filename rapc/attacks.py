"""L-inf attacks in pixel space, for adversarial training and evaluation.

FGSM with random start (fast adversarial training) is PGD with one step of
1.25*eps, so one loop serves both. Attacks never move BatchNorm running
statistics: the paper's code let its 10-40 attack forward passes per batch
pollute them, so the model that was evaluated was not the one trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from rapc.config import AttackConfig


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm keeps normalizing with batch statistics in train mode, but its running stats stay put.

    momentum=0 makes the running-average update a no-op; num_batches_tracked is restored.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    random_start: bool = True,
    autocast_dtype: torch.dtype | None = None,
    keep_fooled: bool = False,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy inside the eps-ball around x, clamped to [0, 1].

    ``autocast_dtype`` runs the forward passes in mixed precision (training); the
    loss is taken in float32 so the sign of the input gradient survives bf16/fp16.
    ``keep_fooled`` (evaluation) freezes an example at the first iterate that fools
    the model, so more steps can only lower robust accuracy. ``start`` is the first
    perturbation (pixel units); None: uniform in the eps-ball, or zero without random start.
    """
    if eps == 0:
        return x.detach()
    x = x.detach()
    # Both constraints are boxes around delta=0 (|delta| <= eps, 0 <= x+delta <= 1), so clamping to
    # one after the other equals one clamp to their intersection, computed once per batch: each step
    # is then three in-place passes (sign, scaled add, clamp) instead of seven with five new tensors.
    lower, upper = (-x).clamp_(min=-eps), (1 - x).clamp_(max=eps)
    if start is not None:
        delta = start.detach().clone()
    else:
        delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
    delta.clamp_(lower, upper)
    autocast = (
        torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    )
    with frozen_bn_stats(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            with autocast:
                logits = model(x + delta)
            loss = F.cross_entropy(logits.float(), y)
            (grad,) = torch.autograd.grad(loss, delta)  # a fresh tensor: free to overwrite
            with torch.no_grad():
                direction = grad.sign_()
                if keep_fooled:
                    direction.mul_((logits.argmax(1) == y).view(-1, *[1] * (x.dim() - 1)))
                delta.add_(direction, alpha=step).clamp_(lower, upper)
    return (x + delta).detach()


def perturb(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig,
    autocast_dtype: torch.dtype | None = None, keep_fooled: bool = False, start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The adversarial batch for an attack config ('none' returns x)."""
    if attack.method == "none":
        return x
    steps = 1 if attack.method == "fgsm" else attack.steps
    return pgd(
        model, x, y, eps=attack.eps, step=attack.step_size, steps=steps,
        random_start=attack.random_start, autocast_dtype=autocast_dtype, keep_fooled=keep_fooled, start=start,
    )


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def attack_batch(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The worst case over the attack's restarts: per example, the image that fooled the model
    (or the last restart's, if none did), and whether the model still classifies it correctly.

    An example the model gets wrong clean is its own adversarial image. Each restart draws its
    random start for the whole batch (from ``generator``, else the global generator) and uses the
    rows of the examples still standing: an example's starts then do not depend on which others
    fell earlier, so with the same seed more restarts, or more steps at the same step size, can
    only lower accuracy, example by example.
    """
    correct = _correct(model, x, y)
    x_adv = x.detach().clone()
    if attack.method == "none":
        return x_adv, correct
    for _ in range(attack.restarts):
        noise = torch.empty_like(x).uniform_(-attack.eps, attack.eps, generator=generator) if attack.random_start else None
        alive = correct.nonzero().squeeze(1)
        if alive.numel() == 0:
            break
        start = None if noise is None else noise[alive]
        candidate = perturb(model, x[alive], y[alive], attack, keep_fooled=True, start=start)
        x_adv[alive] = candidate
        correct[alive] = _correct(model, candidate, y[alive])
    return x_adv, correct


def robust_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig) -> torch.Tensor:
    """Per-example: still classified correctly after every restart of the attack (worst case over restarts)."""
    return attack_batch(model, x, y, attack)[1]
