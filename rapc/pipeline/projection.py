"""Which layers are pruned, by which scheme, and the masks of their projection.

One ``Projector`` is built from the dense model and the pruning config; ADMM's
Z-update calls it on W + U and the hard prune on W. Layers whose scheme keeps
whole channels (registered with ``channels``: filter, channel) are projected per
coupling group (see coupling.py); the other schemes per layer. What a scheme is
comes from its registration in schemes.py, never from its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

from rapc.config import PruningConfig
from rapc.graph import PRUNABLE, build_graph
from rapc.pipeline.coupling import ChannelGroup, Slot, channel_groups, check_supported, output_layers
from rapc.schemes import SCHEMES, Unfit, n_keep, top_mask

Masks = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LayerPlan:
    scheme: str
    ratio: float


def channels(scheme: str) -> str | None:
    """``"out"`` or ``"in"`` for a scheme that keeps whole output or input channels (ranked per coupling group), else None."""
    return SCHEMES.info(scheme).get("channels")


def scheme_options(scheme: str, cfg: PruningConfig) -> dict[str, Any]:
    """The mask function's keyword arguments taken from the config (nm: n and m), as registered."""
    options = SCHEMES.info(scheme).get("options")
    return options(cfg) if options else {}


def layer_plans(model: nn.Module, cfg: PruningConfig) -> dict[str, LayerPlan]:
    """Scheme and ratio per prunable layer: the default, then every matching rule in order; keep_dense wins."""
    plans = {}
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE) or any(fnmatch(name, p) for p in cfg.keep_dense):
            continue
        scheme, ratio = cfg.scheme, cfg.ratio
        for rule in cfg.layers:
            if fnmatch(name, rule.pattern):
                scheme = rule.scheme or scheme
                ratio = rule.ratio if rule.ratio is not None else ratio
        plans[name] = LayerPlan(scheme, ratio)
    return plans


@dataclass(frozen=True)
class GroupUnit:
    """Rank a coupling group's channels jointly over its member slots and keep the same ones everywhere."""

    group: ChannelGroup
    slots: tuple[Slot, ...]
    attached: tuple[Slot, ...]
    ratio: float
    round_to: int = 1  # the kept count is a multiple of it (pruning.round_to)

    @property
    def kept(self) -> int:
        return n_keep(self.group.size, self.ratio, self.round_to)

    def masks(self, weights: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None) -> Masks:
        scores = sum(s.gather(weights[s.param], self.group.size) for s in self.slots)
        keep = top_mask(scores, self.ratio, self.round_to)
        out = {s.param: s.expand(keep, weights[s.param]) for s in self.slots}
        if params is not None:
            out.update({a.param: a.expand(keep, params[a.param]) for a in self.attached})
        return out


@dataclass(frozen=True)
class LayerUnit:
    param: str
    scheme: str
    ratio: float
    options: dict = field(default_factory=dict)

    def masks(self, weights: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None) -> Masks:
        return {self.param: SCHEMES.get(self.scheme)(weights[self.param], self.ratio, **self.options)}


class Projector:
    """Projection onto the pruning config's sparsity set, for every pruned weight of one model."""

    def __init__(self, model: nn.Module, example: torch.Tensor, cfg: PruningConfig) -> None:
        check_supported(model)
        outputs = output_layers(model, example)
        self.groups = channel_groups(build_graph(model, example), model, ignored=outputs)
        self.plans = layer_plans(model, cfg)
        self.notes: list[str] = []
        self.units: list[GroupUnit | LayerUnit] = []
        grouped: set[str] = set()
        for group in self.groups:
            # A depthwise conv's filter c is its only reader of input channel c: it keeps input channels as a consumer does.
            for side, slots in (("out", group.producers), ("in", group.consumers + group.depthwise)):
                members = tuple(s for s in slots if self._channels(s.layer) == side)
                if not members:
                    continue
                layers = {s.layer for s in members}
                whole = layers >= {s.layer for s in slots}
                attached = tuple(a for a in group.attached if side == "out" and (a.owner in layers or (a.owner is None and whole)))
                ratio = min(self.plans[n].ratio for n in layers)
                if round((1.0 - ratio) * group.size) < 1:
                    kept = n_keep(group.size, ratio, cfg.round_to)
                    self.notes.append(f"{', '.join(sorted(layers))}: ratio {ratio:g} would prune all {group.size} channels; {kept} "
                                      f"{'is' if kept == 1 else 'are'} kept")
                self.units.append(GroupUnit(group, members, attached, ratio, cfg.round_to))
                grouped |= {f"{n}/{side}" for n in layers}
        for name, plan in self.plans.items():
            side = channels(plan.scheme)
            if side is not None and f"{name}/{side}" in grouped:
                continue
            if side == "out" and name in outputs:
                self.notes.append(f"{name}: output layer, its filters are the classes; left dense")
                continue
            options = scheme_options(plan.scheme, cfg)
            try:  # the scheme itself says whether this weight's shape fits it (nm: input channels a multiple of m)
                SCHEMES.get(plan.scheme)(model.get_submodule(name).weight, plan.ratio, **options)
            except Unfit as exc:
                self.notes.append(f"{name}: {exc}; left dense")
                continue
            if side == "in":
                self.notes.append(f"{name}: input channels come from the network input; zeroed, not removable")
            self.units.append(LayerUnit(f"{name}.weight", plan.scheme, plan.ratio, options))
        if cfg.round_to > 1:
            order = {name: i for i, (name, _) in enumerate(model.named_modules())}
            self.notes.append(self._rounding(cfg.round_to, order))

    def _rounding(self, round_to: int, order: dict[str, int]) -> str:
        """What pruning.round_to made of each channel group, in model order: for the summary and the compress output."""
        widths = []
        for unit in (u for u in self.units if isinstance(u, GroupUnit)):
            layers = sorted({s.layer for s in unit.slots}, key=order.__getitem__)
            asked = n_keep(unit.group.size, unit.ratio)
            widths.append((order[layers[0]], f"{'+'.join(layers)} {unit.kept}/{unit.group.size}"
                           + (f" (the ratio alone: {asked})" if unit.kept != asked else "")))
        listed = ", ".join(text for _, text in sorted(widths)) or "no channel group is pruned"
        return (f"pruning.round_to={round_to}: every pruned channel group keeps a multiple of {round_to} channels "
                f"(rounded up, at most the group's width); kept/channels: {listed}")

    def _channels(self, layer: str) -> str | None:
        plan = self.plans.get(layer)
        return channels(plan.scheme) if plan else None

    @property
    def targets(self) -> list[str]:
        """Names of the weights that are projected (ADMM's Z and U live on these)."""
        names = []
        for unit in self.units:
            names += [s.param for s in unit.slots] if isinstance(unit, GroupUnit) else [unit.param]
        return names

    def masks(self, weights: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None) -> Masks:
        """Boolean keep-masks for the targets, computed on ``weights`` (W, or W + U for ADMM).

        With ``params`` (all named parameters) the masks also cover the biases and BatchNorm
        scale/shift of pruned filters, so a pruned channel emits exactly zero.
        """
        masks: Masks = {}
        for unit in self.units:
            masks.update(unit.masks(weights, params))
        return masks
