"""Physical shrink: zero channels become smaller dense layers, exactly.

A group channel is removed when it is dead: zero in every producer (weights,
bias and BatchNorm scale/shift, so the channel emits exactly zero), ignored by
every consumer, or silenced by a depthwise conv that alone reads the layers
before it. Zeros that are not whole coupled channels stay as zeros and are
reported, so the report says how much of the sparsity became real speed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rapc.config import ShrinkConfig
from rapc.errors import RapcError
from rapc.graph import build_graph
from rapc.pipeline.coupling import ChannelGroup, Slot, channel_groups, check_supported, output_layers


@dataclass
class ShrinkResult:
    model: nn.Module
    history: list
    removed: dict[str, int]  # group root layer -> channels removed
    kept_zero: list[str] = field(default_factory=list)  # zero channels that stayed, and why
    max_abs_diff: float = 0.0


def _zero(slots: tuple[Slot, ...], params: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Per group channel: every one of these slots is exactly zero there."""
    if not slots:
        return torch.zeros(size, dtype=torch.bool)
    return torch.stack([s.gather(params[s.param], size).cpu() == 0 for s in slots]).all(0)


def dead_channels(group: ChannelGroup, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    """Removable channels of a group, and a note for channels zero in some producers only."""
    silent = _zero(group.producers + group.attached, params, group.size) if group.producers else torch.zeros(group.size, dtype=torch.bool)
    ignored = _zero(group.consumers, params, group.size) if group.consumers else torch.zeros(group.size, dtype=torch.bool)
    dead = silent | ignored
    for sources in group.depthwise_sources:
        if sources:  # a silent depthwise conv cuts off the layers only it reads: they need not be zero
            after = tuple(s for s in group.producers + group.attached if s.layer not in sources and s.owner not in sources)
            dead |= _zero(after, params, group.size)
    notes = []
    for slot in group.producers:
        partial = (slot.gather(params[slot.param], group.size).cpu() == 0) & ~dead
        if partial.any():
            notes.append(f"{group.root_layer} group: {int(partial.sum())} zero filters of {slot.layer} are live in a coupled layer; kept as zeros")
    return dead, notes


def _rounded(dead: torch.Tensor, round_to: int) -> torch.Tensor:
    """Drop dead channels only so far that the kept width is a multiple of round_to (and at least one).

    shrink.round_to, the safety net: it can only keep zeros. pruning.round_to has the projection keep a
    multiple of the best channels instead, so its widths arrive here already rounded."""
    size = dead.numel()
    keep = max(1, min(size, math.ceil((size - int(dead.sum())) / round_to) * round_to))
    idxs = dead.nonzero().squeeze(1)[: size - keep]
    return idxs


@torch.no_grad()
def _max_abs_diff(a: nn.Module, b: nn.Module, batch: torch.Tensor) -> float:
    return float((a(batch) - b(batch)).abs().max())


def shrink(model: nn.Module, batch: torch.Tensor, cfg: ShrinkConfig) -> ShrinkResult:
    """A copy of ``model`` with its dead channels removed; fails above ``cfg.tolerance`` max abs diff."""
    check_supported(model)
    was_training = model.training
    model.eval()
    shrunk = copy.deepcopy(model)
    graph = build_graph(shrunk, batch)
    groups = channel_groups(graph, shrunk, ignored=output_layers(shrunk, batch))
    params = dict(shrunk.named_parameters())
    plan, notes = [], []
    for group in groups:
        dead, group_notes = dead_channels(group, params)
        notes += group_notes
        idxs = _rounded(dead, cfg.round_to)
        if int(dead.sum()) > len(idxs):
            notes.append(f"{group.root_layer} group: {int(dead.sum()) - len(idxs)} zero channels kept for shrink.round_to={cfg.round_to}")
        if len(idxs):
            plan.append((group.root_layer, idxs.tolist()))
    for root, idxs in plan:
        module = shrunk.get_submodule(root)
        graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, idxs).prune()
    shrunk.eval()
    diff = _max_abs_diff(model, shrunk, batch)
    model.train(was_training)
    if not diff <= cfg.tolerance:
        raise RapcError(f"shrink is not exact: max abs output difference {diff:.3g} > {cfg.tolerance:g}")
    return ShrinkResult(shrunk, graph.pruning_history(), {root: len(idxs) for root, idxs in plan}, notes, diff)
