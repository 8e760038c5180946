"""Frozen masks for masked retraining: pruned weights stay exactly zero.

Gradients are masked before the optimizer step, so momentum and Adam moments of
pruned weights stay zero and cannot resurrect them; weights are masked again
after the step, so weight decay or numerical drift cannot either.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from rapc.pipeline.loop import Hooks
from rapc.pipeline.projection import Projector


class MaskSet:
    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        self.params = dict(model.named_parameters())
        self.load_state_dict(masks)

    def hooks(self) -> Hooks:
        """The training-loop hooks of masked training: gradients masked before the step, weights after it."""
        return Hooks(before_step=self.mask_grads, after_step=self.apply)

    @torch.no_grad()
    def apply(self) -> None:
        for param, mask in self.pairs:
            param.mul_(mask)

    @torch.no_grad()
    def mask_grads(self) -> None:
        for param, mask in self.pairs:
            if param.grad is not None:
                param.grad.mul_(mask)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.cpu() for name, mask in self.masks.items()}

    def load_state_dict(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.pairs = [(self.params[name], mask.to(self.params[name].device, self.params[name].dtype)) for name, mask in masks.items()]
        self.masks = dict(masks)


def hard_prune(model: nn.Module, projector: Projector) -> MaskSet:
    """Zero what the projection of the current weights drops, and return the masks that keep it zero:
    the hard prune after ADMM, or a one-shot magnitude prune of a trained model."""
    params = dict(model.named_parameters())
    masks = MaskSet(model, projector.masks({n: params[n] for n in projector.targets}, params))
    masks.apply()
    return masks
