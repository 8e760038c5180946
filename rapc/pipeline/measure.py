"""Size and cost of a model: parameters, MACs, and realized sparsity per prunable layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch_pruning as tp
from torch import nn

from rapc.pipeline.coupling import PRUNABLE


@dataclass(frozen=True)
class LayerStats:
    name: str
    shape: tuple[int, ...]
    params: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.params, 1)


def layer_stats(model: nn.Module) -> list[LayerStats]:
    """Weight shape, size and exact-zero count of every conv and linear layer."""
    return [
        LayerStats(name, tuple(m.weight.shape), m.weight.numel(), int((m.weight == 0).sum()))
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


def summary(model: nn.Module, example: torch.Tensor) -> dict:
    layers = layer_stats(model)
    macs, params = macs_and_params(model, example)
    prunable = sum(s.params for s in layers)
    zeros = sum(s.zeros for s in layers)
    return {
        "params": params,
        "macs": macs,
        "sparsity": zeros / max(prunable, 1),
        "layers": [{**asdict(s), "sparsity": s.sparsity} for s in layers],
    }
