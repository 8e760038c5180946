"""Channel coupling: which tensor positions hold the same channel, from torch-pruning's DependencyGraph.

A residual add ties the output channels of every conv feeding it; a flatten maps
one conv channel to h*w linear inputs; a depthwise conv (groups == in == out)
reads and writes the same channel, so its input and output channels are one. An
SE gate's expand layer is tied to the feature map it multiplies. Filter and
channel projections rank and zero channels per group so every zero channel ADMM
creates can be removed, and the shrinker decides removability over the same groups.
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
    # Depthwise convs, dim 0 (also among the producers): filter c reads input c only, so zeroing it
    # ignores the input channel. Not consumers for removability: their output channel is in the
    # group too, so whether the channel is dead is decided by the layers after them.
    depthwise: tuple[Slot, ...] = ()
    # Per depthwise conv: the layers whose outputs nothing but it reads. Its zero filter and BatchNorm
    # silence the channel after it, and before it the channel is read by nobody else: removable.
    depthwise_sources: tuple[tuple[str, ...], ...] = ()


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


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


def check_supported(model: nn.Module) -> None:
    """Refuse convolutions whose channels torch-pruning cannot remove exactly: grouped ones, except depthwise.

    torch-pruning treats a conv with groups == out_channels as depthwise and any other grouped conv as
    dense, so removing a channel of either would cut the wrong weights; keeping such a layer dense does
    not help, since its channels are still coupled to the layers around it.
    """
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or m.groups == 1 or is_depthwise(m):
            continue
        shape = f"groups={m.groups}, in_channels={m.in_channels}, out_channels={m.out_channels}"
        if m.groups == m.in_channels:
            raise RapcError(f"layer {name}: depthwise convolution with channel multiplier {m.out_channels // m.in_channels} ({shape}) cannot be "
                            f"pruned exactly (each input channel owns {m.out_channels // m.in_channels} filters); "
                            f"rapc prunes only plain (groups=1) and depthwise (groups == in_channels == out_channels) convolutions")
        raise RapcError(f"layer {name}: grouped convolution ({shape}) cannot be pruned exactly; "
                        f"rapc prunes only plain (groups=1) and depthwise (groups == in_channels == out_channels) convolutions")


def channel_groups(graph: tp.DependencyGraph, model: nn.Module, ignored: list[str]) -> list[ChannelGroup]:
    names = {m: n for n, m in model.named_modules()}
    ignored_modules = [model.get_submodule(n) for n in ignored]
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=PRUNABLE):
        size = len(group[0].idxs)
        root_layer = names[group[0].dep.target.module]
        producers, consumers, attached, depthwise, sources = [], [], [], [], []
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if module not in names:
                continue
            name = names[module]
            index = torch.as_tensor(list(item.idxs), dtype=torch.long)
            root = torch.as_tensor(list(item.root_idxs), dtype=torch.long)  # the group channel of each position
            out = graph.is_out_channel_pruning_fn(handler) or is_depthwise(module)
            if isinstance(module, PRUNABLE):
                _check_positions(module.weight, name, int(not out), index, root_layer, size)
                (producers if out else consumers).append(Slot(f"{name}.weight", name, int(not out), index, root))
                if is_depthwise(module):
                    depthwise.append(producers[-1])
                    sources.append(_sole_sources(graph.module2node[module], names))
                if out and module.bias is not None:
                    attached.append(Slot(f"{name}.bias", name, 0, index, root, owner=name))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                _check_positions(module.weight, name, 0, index, root_layer, size)
                source = graph.module2node[module].inputs
                owner = names.get(source[0].module) if len(source) == 1 else None
                attached += [Slot(f"{name}.{p}", name, 0, index, root, owner=owner) for p in ("weight", "bias")]
        groups.append(ChannelGroup(root_layer, size, tuple(producers), tuple(consumers), tuple(attached), tuple(depthwise), tuple(sources)))
    return groups


def _sole_sources(node, names: dict[nn.Module, str]) -> tuple[str, ...]:
    """The prunable layers whose outputs reach only this node (through BatchNorm, activations, adds);
    none when any tensor on the way is also read elsewhere."""
    found, stack, seen = [], list(node.inputs), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(set(n.outputs)) != 1:
            return ()
        if isinstance(n.module, PRUNABLE):
            found.append(names[n.module])
        else:
            stack += n.inputs
    return tuple(found)


def _check_positions(weight: torch.Tensor, name: str, dim: int, index: torch.Tensor, root_layer: str, size: int) -> None:
    """The positions torch-pruning maps a group's channels to must exist in the layer (a reshape it misread would not)."""
    if len(index) and int(index.max()) < weight.shape[dim] and len(set(index.tolist())) == len(index):
        return
    side = "output" if dim == 0 else "input"
    raise RapcError(f"layer {name}: torch-pruning maps the {size} channels of {root_layer} onto {len(index)} {side} positions "
                    f"(up to {int(index.max()) if len(index) else -1}) of a layer with {weight.shape[dim]}; a reshape between them is "
                    f"not a channel-preserving view or an NCHW flatten, so its channels cannot be pruned exactly")
