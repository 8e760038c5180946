"""Allocation units and their robustness sensitivity: how much the adversarial loss rises when one
unit alone is pruned at each ratio.

A unit is what the projector prunes as one: a coupling group (every member layer keeps the same
channels, so it can only take one ratio) or a single layer. The allocator (allocation.py) chooses
one ratio per unit; the sensitivity measured here tells it which units are cheap to prune.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatch
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rapc.attacks import perturb
from rapc.config import AttackConfig, PruningConfig
from rapc.pipeline.masks import MaskSet
from rapc.pipeline.projection import GroupUnit, LayerUnit, Projector, layer_plans
from rapc.schemes import n_keep, widths as group_widths
from rapc.progress import Reporter, SilentReporter

# How far a unit pruned per layer (irregular, column, nm, or channels of the network input) is taken.
# Its zeros mostly stay in the shrunk model, so pruning it further would cost robustness and save nothing.
LAYER_MOST = 0.99


@dataclass(frozen=True)
class Unit:
    """One allocation unit: a projector unit and the layers that share its ratio."""

    name: str  # its layers joined by "+"
    layers: tuple[str, ...]
    projection: GroupUnit | LayerUnit  # as the projector built it; `at` sets its ratio
    fixed: float | None = None  # a ratio the user's own pruning.layers rule set; None: the allocator's to choose

    @property
    def size(self) -> int | None:
        """Channels of the coupling group; None for a unit pruned per layer."""
        return self.projection.group.size if isinstance(self.projection, GroupUnit) else None

    @property
    def round_to(self) -> int:
        return self.projection.round_to if isinstance(self.projection, GroupUnit) else 1

    @property
    def widths(self) -> list[int]:
        """The channel counts the group can keep, ascending (multiples of pruning.round_to, and all of it)."""
        assert self.size is not None
        return group_widths(self.size, self.round_to)

    @property
    def most(self) -> float:
        """The largest ratio that still changes something: the fewest channels of a group kept (one, or round_to)."""
        return self.ratio_keeping(self.widths[0]) if self.size is not None else LAYER_MOST

    def kept(self, ratio: float) -> float:
        """What a ratio keeps: channels of a group (exact, so equal ratios are recognised), else the ratio itself."""
        return n_keep(self.size, ratio, self.round_to) if self.size is not None else round(ratio, 9)

    def ratio_keeping(self, channels: int) -> float:
        """The ratio that keeps exactly ``channels`` of the group (one of ``widths``), as a short decimal where one is exact enough."""
        assert self.size is not None and channels in self.widths, (channels, self.widths)
        ratio = round(1.0 - channels / self.size, 6)
        return ratio if self.kept(ratio) == channels else 1.0 - channels / self.size

    def at(self, ratio: float) -> GroupUnit | LayerUnit:
        return replace(self.projection, ratio=ratio)


def allocation_units(model: nn.Module, projector: Projector, pruning: PruningConfig) -> list[Unit]:
    """The projector's units, named by their layers, with the ratio of any that a user's rule fixes.

    A layer is fixed when one of ``pruning.layers`` that matches it sets a ratio; a group with a fixed
    member takes the smallest such ratio, as the projector would. keep_dense layers and the output
    layer are in no unit: the projector leaves them dense.
    """
    plans = layer_plans(model, pruning)
    user = {name for name in plans if any(rule.ratio is not None and fnmatch(name, rule.pattern) for rule in pruning.layers)}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    units = []
    for unit in projector.units:
        if isinstance(unit, GroupUnit):
            layers = tuple(sorted({s.layer for s in unit.slots}, key=order.__getitem__))
        else:
            layers = (unit.param.removesuffix(".weight"),)
        fixed = [plans[n].ratio for n in layers if n in user]
        units.append(Unit("+".join(layers), layers, unit, min(fixed) if fixed else None))
    return sorted(units, key=lambda u: order[u.layers[0]])  # in model order, as a reader meets them


@dataclass
class Sensitivity:
    """Per allocation unit, the rise of the adversarial loss when that unit alone is pruned at each ratio.

    Losses are mean cross-entropies (nats) on the same training images, attacked afresh for every
    pruned model from the same random starts, so two numbers differ only by the pruning.
    """

    baseline: float  # loss of the unpruned model
    ratios: list[float]
    rise: dict[str, list[float]]  # unit name -> loss rise at each of `ratios`
    n_images: int
    attack: str  # e.g. "pgd eps=0.3 steps=40"

    def at(self, unit: str, ratio: float) -> float:
        """The rise at ``ratio``, linear between the measured ratios (0 at ratio 0), flat beyond the last."""
        xs, ys = [0.0, *self.ratios], [0.0, *self.rise[unit]]
        return _interp(ratio, xs, ys)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sensitivity:
        return cls(**data)


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[-1]


def _describe(attack: AttackConfig) -> str:
    if attack.method == "none":
        return "clean"
    steps = 1 if attack.method == "fgsm" else attack.steps
    return f"{attack.method} eps={attack.eps:g} steps={steps} step={attack.step_size:.3g}"


def _adversarial_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig,
                      starts: torch.Tensor | None, batch_size: int) -> float:
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        start = None if starts is None else starts[i:i + batch_size]
        adv = perturb(model, xb, yb, attack, start=start)
        with torch.no_grad():
            total += float(F.cross_entropy(model(adv), yb, reduction="sum"))
    return total / len(x)


def sensitivity(
    model: nn.Module, example: torch.Tensor, pruning: PruningConfig, images: torch.Tensor, labels: torch.Tensor,
    attack: AttackConfig, reporter: Reporter | None = None, *, seed: int = 0, batch_size: int = 256,
) -> Sensitivity:
    """The adversarial loss rise of every free unit pruned alone at each of ``pruning.sensitivity.ratios``.

    ``images`` are pixels in [0, 1] (training images: the test split must not steer pruning); the first
    ``pruning.sensitivity.n_images`` are used. Each unit is hard-projected in place (the same magnitude
    projection the pipeline uses, biases and BatchNorm of pruned filters included), measured and
    restored, so the model is left as it came. The random starts are drawn once from ``seed`` and
    shared by every measurement. Cost: (units x ratios + 1) attacks of n_images images, e.g.
    12 x 5 + 1 = 61 for a ResNet-18 with the filter scheme; units whose ratio a user's rule fixes
    are not measured.
    """
    reporter = reporter or SilentReporter()
    ratios = sorted(pruning.sensitivity.ratios)
    device = next(model.parameters()).device
    x = images[: pruning.sensitivity.n_images].to(device)
    y = labels[: pruning.sensitivity.n_images].to(device)
    starts = None
    if attack.method != "none" and attack.random_start:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.empty(x.shape).uniform_(-attack.eps, attack.eps, generator=generator).to(device)
    units = [u for u in allocation_units(model, Projector(model, example, pruning), pruning) if u.fixed is None]
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    try:
        baseline = _adversarial_loss(model, x, y, attack, starts, batch_size)
        rise: dict[str, list[float]] = {}
        reporter.begin("sensitivity", len(units) * len(ratios))
        for unit in units:
            rise[unit.name] = []
            for ratio in ratios:
                masks = unit.at(ratio).masks(params, params)
                saved = {name: params[name].detach().clone() for name in masks}
                MaskSet(model, masks).apply()
                try:
                    rise[unit.name].append(_adversarial_loss(model, x, y, attack, starts, batch_size) - baseline)
                finally:
                    with torch.no_grad():
                        for name, value in saved.items():
                            params[name].copy_(value)
                reporter.advance({"rise": rise[unit.name][-1]})
    finally:
        model.train(was_training)
    reporter.end(f"sensitivity: {len(units)} units x {len(ratios)} ratios on {len(x)} images, "
                 f"{_describe(attack)}, baseline loss {baseline:.3f}")
    return Sensitivity(baseline, ratios, rise, len(x), _describe(attack))
