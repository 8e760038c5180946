"""torch-pruning's dependency graph of a model, traced the one way rapc needs it.

Core, because the saved-model format replays a pruning history on a graph when it loads
a compressed model, and the pipeline ranks and removes channels over the same graph.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

PRUNABLE = (nn.Conv2d, nn.Linear)  # the layers whose weights schemes project and counts measure


class _SavedSizes:
    """A view/reshape autograd node that also answers to the attribute name torch-pruning 1.6 reads."""

    def __init__(self, grad_fn) -> None:
        self._grad_fn = grad_fn
        self._saved_self_sizes = tuple(grad_fn._saved_self_sym_sizes)

    def __getattr__(self, name: str):
        return getattr(self._grad_fn, name)


class _Graph(tp.DependencyGraph):
    """torch-pruning's graph, with the input shape of every reshape visible to its index mapping.

    torch-pruning 1.6 reads a reshape's input shape from ``grad_fn._saved_self_sizes``, which torch 2
    calls ``_saved_self_sym_sizes``. Without it, it guesses the stride of every view from the nearest
    layers' widths, and an SE gate's ``s.view(b, c, 1, 1)`` in a network that flattens a 2x2 map later
    becomes a "flatten" that maps c channels onto 4c positions. With the shape, a view of a [b, c]
    tensor keeps its channels and only a real [b, c, h, w] flatten spreads a channel over h*w inputs.
    """

    def _trace(self, *args, **kwargs):
        module2node = super()._trace(*args, **kwargs)
        for node in module2node.values():
            grad_fn = node.grad_fn
            if node.type == tp.ops.OPTYPE.RESHAPE and not hasattr(grad_fn, "_saved_self_sizes") and hasattr(grad_fn, "_saved_self_sym_sizes"):
                node.grad_fn = _SavedSizes(grad_fn)
        return module2node


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Trace the model; torch-pruning needs autograd on and leaves the model in eval mode, so restore it."""
    was_training = model.training
    with torch.enable_grad():
        graph = _Graph().build_dependency(model, example_inputs=example)
    model.train(was_training)
    return graph
