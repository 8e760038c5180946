"""torch-pruning's dependency graph of a model, traced the one way rapc needs it.

Core, because the saved-model format replays a pruning history on a graph when it loads
a compressed model, and the pipeline ranks and removes channels over the same graph.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

PRUNABLE = (nn.Conv2d, nn.Linear)  # the layers whose weights schemes project and counts measure


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Trace the model; torch-pruning needs autograd on and leaves the model in eval mode, so restore it."""
    was_training = model.training
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    model.train(was_training)
    return graph
