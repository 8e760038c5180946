"""Size and cost of a model: parameters, MACs, and realized sparsity per prunable layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from rapc.graph import PRUNABLE


@dataclass(frozen=True)
class LayerStats:
    name: str
    shape: tuple[int, ...]
    params: int
    zeros: int
    macs: int = 0  # per image; 0 when no example input was given

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.params, 1)


@torch.no_grad()
def _layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Dense multiply-accumulates per image of every conv and linear layer, from one forward pass."""
    macs: dict[str, int] = {}

    def hook(name: str, module: nn.Module, output: torch.Tensor) -> None:
        per_output = module.weight[0].numel()  # (in/groups)*kh*kw for a conv, in for a linear
        macs[name] = output[:1].numel() * per_output

    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: hook(name, mod, out))
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE)
    ]
    was_training = model.training
    try:
        model.eval()(example[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return macs


def layer_stats(model: nn.Module, example: torch.Tensor | None = None) -> list[LayerStats]:
    """Weight shape, size, exact-zero count (and, given an example input, MACs) of every conv and linear layer."""
    macs = _layer_macs(model, example) if example is not None else {}
    return [
        LayerStats(name, tuple(m.weight.shape), m.weight.numel(), int((m.weight == 0).sum()), macs.get(name, 0))
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE)
    ]


@torch.no_grad()
def macs_and_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one image and parameter count (torch-pruning's counter)."""
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example[:1])
    model.train(was_training)
    return int(macs), int(params)


def sparsity(model: nn.Module) -> float:
    """Fraction of conv/linear weights that are exactly zero."""
    layers = layer_stats(model)
    return sum(s.zeros for s in layers) / max(1, sum(s.params for s in layers))


def summary(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Totals: parameters, MACs per image, sparsity."""
    macs, params = macs_and_params(model, example)
    return {"params": params, "macs": macs, "sparsity": sparsity(model)}


def compare_layers(before: list[LayerStats], after: list[LayerStats]) -> list[dict]:
    """Per layer, the masked model beside the shrunk one: shape, params, MACs, realized sparsity."""
    after_by_name = {s.name: s for s in after}
    return [
        {
            "name": b.name,
            "shape_before": list(b.shape), "shape_after": list(after_by_name[b.name].shape),
            "params_before": b.params, "params_after": after_by_name[b.name].params,
            "macs_before": b.macs, "macs_after": after_by_name[b.name].macs,
            "sparsity_before": b.sparsity, "sparsity_after": after_by_name[b.name].sparsity,
        }
        for b in before
    ]
