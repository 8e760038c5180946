"""Channel coupling: which tensor positions hold the same channel, from torch-pruning's DependencyGraph.

A residual add ties the output channels of every conv feeding it; a flatten maps
one conv channel to h*w linear inputs. Filter and channel projections rank and
zero channels per group so every zero channel ADMM creates can be removed, and
the shrinker decides removability over the same groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from rapc.errors import RapcError
from rapc.graph import PRUNABLE


@dataclass(frozen=True)
class Slot:
    """The positions of a group's channels along one dimension of one parameter."""

    param: str  # e.g. "layer1.0.conv1.weight"
    layer: str  # the module that owns the parameter
    dim: int
    index: torch.Tensor  # positions along dim
    root: torch.Tensor  # the group channel each position belongs to
    owner: str | None = None  # for a bias/BatchNorm slot: the layer whose output it follows

    def gather(self, tensor: torch.Tensor, size: int) -> torch.Tensor:
        """Per-group-channel squared norm of this slot's slices of ``tensor`` (shape [size])."""
        sliced = tensor.detach().index_select(self.dim, self.index.to(tensor.device)).transpose(0, self.dim)
        per_position = sliced.reshape(sliced.shape[0], -1).float().pow(2).sum(1)
        return torch.zeros(size, device=tensor.device).index_add_(0, self.root.to(tensor.device), per_position)

    def expand(self, keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Mask for ``like`` that zeroes the positions of the dropped group channels."""
        mask = torch.ones_like(like, dtype=torch.bool)
        dropped = self.index[~keep.cpu()[self.root]].to(like.device)
        mask.index_fill_(self.dim, dropped, False)
        return mask


@dataclass(frozen=True)
class ChannelGroup:
    root_layer: str
    size: int
    producers: tuple[Slot, ...]  # conv/linear weights, dim 0
    consumers: tuple[Slot, ...]  # conv/linear weights, dim 1
    attached: tuple[Slot, ...]  # biases and BatchNorm affine parameters, dim 0


def output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The last prunable layer run in a forward pass: its outputs are the classes and are never pruned."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order[-1:]


def check_supported(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels:
            raise RapcError(f"layer {name}: grouped convolutions (groups={m.groups}) cannot be pruned safely")


def channel_groups(graph: tp.DependencyGraph, model: nn.Module, ignored: list[str]) -> list[ChannelGroup]:
    names = {m: n for n, m in model.named_modules()}
    ignored_modules = [model.get_submodule(n) for n in ignored]
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=PRUNABLE):
        size = len(group[0].idxs)
        producers, consumers, attached = [], [], []
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if module not in names:
                continue
            name = names[module]
            index = torch.as_tensor(list(item.idxs), dtype=torch.long)
            # torch-pruning lists a flattened channel's h*w positions contiguously, in channel order.
            root = torch.arange(len(index)) // (len(index) // size)
            out = graph.is_out_channel_pruning_fn(handler)
            if isinstance(module, PRUNABLE):
                (producers if out else consumers).append(Slot(f"{name}.weight", name, int(not out), index, root))
                if out and module.bias is not None:
                    attached.append(Slot(f"{name}.bias", name, 0, index, root, owner=name))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                source = graph.module2node[module].inputs
                owner = names.get(source[0].module) if len(source) == 1 else None
                attached += [Slot(f"{name}.{p}", name, 0, index, root, owner=owner) for p in ("weight", "bias")]
        groups.append(ChannelGroup(names[group[0].dep.target.module], size, tuple(producers), tuple(consumers), tuple(attached)))
    return groups
