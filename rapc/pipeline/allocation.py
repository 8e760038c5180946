"""A whole-model budget into per-layer pruning ratios.

``pruning.target`` keeps a fraction of the dense model's MACs, parameters or latency, measured on
the shrunk model: what the hard prune and the physical shrink will make of the dense model. The
allocator chooses one ratio per allocation unit (sensitivity.py: a coupling group or one layer)
and writes them as exact-name rules (``Allocation.apply``), so the projector, ADMM, masks and the
shrink run unchanged. The shrunk architecture depends only on how many channels each unit keeps,
not on which, so the budget solved on the dense weights is the budget of the final model.

- uniform: one ratio for every unit, by bisection on the exact cost.
- sensitivity: the ratios with the least summed adversarial-loss rise that meet the target. Greedy
  over each unit's ladder of measured ratios, best loss rise per unit of cost saved first; the cost
  of a step is estimated from each unit's cost measured alone and corrected by an exact
  measurement once the estimate reaches the target; the last unit moved is then bisected so the
  target is hit.

Both end by giving back channels of the finest-grained unit when the step of one coarse channel
left the cost more than ``BAND`` below the target. Cost of a solve, counted in shrunk models
measured (each a deep copy, a projection, torch-pruning's shrink and one call of the cost): with
U units and L sensitivity ratios, uniform U + 2 + log2(distinct widths) (about 15) plus log2(channels)
for a fill; sensitivity U x (L + 1) + 1 (72 + 1 for a ResNet-18's 12 units and 5 ratios), a few
exact checks near the target and log2(channels) per bisection. Never a search over all
combinations; each solve records its count in ``Allocation.evaluations``.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

from rapc.config import LayerRule, PruningConfig, ShrinkConfig
from rapc.errors import RapcError
from rapc.measure import macs_and_params
from rapc.pipeline.masks import MaskSet, hard_prune
from rapc.pipeline.projection import Projector, layer_plans
from rapc.pipeline.sensitivity import Sensitivity, Unit, allocation_units
from rapc.pipeline.shrink import shrink
from rapc.progress import Reporter, SilentReporter
from rapc.tables import Table

Cost = Callable[[nn.Module], float]  # the cost of a (shrunk) model: MACs, parameters or a measured latency

TOLERANCE = 0.02  # |achieved / target - 1| of a solution that meets its target
BAND = 0.01  # the solver aims at [target * (1 - BAND), target]: at or under the budget, well inside TOLERANCE


def metric_cost(metric: str, example: torch.Tensor) -> Cost:
    """The cost of a macs or params target: torch-pruning's count on one image. A latency target is
    measured on a bench backend, which the pipeline cannot import: its caller passes that cost in."""
    index = {"macs": 0, "params": 1}
    if metric not in index:
        raise RapcError(f"pruning.target.{metric} is measured on a bench backend; pass its cost callable")
    return lambda model: float(macs_and_params(model, example)[index[metric]])


def shrunk_cost(model: nn.Module, example: torch.Tensor, pruning: PruningConfig, shrink_cfg: ShrinkConfig, cost: Cost) -> float:
    """``cost`` of the model hard-projected at the config's per-layer ratios and physically shrunk.

    The model is deep-copied and left as it came. The allocator measures the same thing faster,
    with one projector for all its candidates; this is the pipeline's own path, start to end.
    """
    pruned = copy.deepcopy(model)
    hard_prune(pruned, Projector(pruned, example, pruning))
    return float(cost(shrink(pruned, example, shrink_cfg).model))


@dataclass
class UnitChoice:
    """The ratio chosen for one allocation unit, and what it means."""

    name: str
    layers: list[str]
    ratio: float
    channels: int | None  # of the coupling group; None for a unit pruned per layer
    kept: int | None  # channels the ratio keeps
    share: float | None  # fraction of the dense cost this unit alone saves at its most pruning; None when fixed
    fixed: bool = False  # the ratio is the user's own pruning.layers rule


@dataclass
class Allocation:
    """Per-layer ratios that meet a budget: written to the run (allocation.json), reused on resume."""

    metric: str  # macs, params or latency
    target: float  # the fraction of the dense cost to keep
    achieved: float  # cost / dense_cost of the shrunk model at these ratios
    dense_cost: float
    cost: float
    method: str  # uniform or sensitivity
    ratios: dict[str, float]  # per prunable layer; every layer of a coupled unit has the unit's ratio
    units: list[UnitChoice]
    reason: str | None = None  # when the target is not met within TOLERANCE: the nearest achievable and why
    sensitivity: Sensitivity | None = None
    evaluations: int = 0  # shrunk models measured to solve it
    seconds: float = 0.0
    round_to: int = 1  # pruning.round_to the widths were solved with (1 in an allocation.json from before it)

    @property
    def met(self) -> bool:
        return abs(self.achieved / self.target - 1.0) <= TOLERANCE

    def apply(self, pruning: PruningConfig) -> PruningConfig:
        """The config with one exact-name rule per allocated layer appended, so these ratios win."""
        out = pruning.model_copy(deep=True)
        out.layers = [*pruning.layers, *(LayerRule(pattern=_exact(name), ratio=ratio) for name, ratio in self.ratios.items())]
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Allocation:
        data = dict(data)
        data["units"] = [UnitChoice(**u) for u in data["units"]]
        data["sensitivity"] = Sensitivity.from_dict(data["sensitivity"]) if data.get("sensitivity") else None
        return cls(**data)

    def table(self) -> Table:
        """Per unit: chosen ratio, channels kept, the most it can save, and its loss rise at each measured ratio."""
        sens = self.sensitivity
        headers = ("unit", "ratio", "kept", f"max {self.metric} saving")
        if sens is not None:
            headers += tuple(f"rise @{r:g}" for r in sens.ratios)
        rows = []
        for u in self.units:
            row = (u.name, f"{u.ratio:.4g}" + (" (fixed)" if u.fixed else ""),
                   f"{u.kept}/{u.channels}" if u.channels else "-", "-" if u.share is None else f"{u.share:.3f}")
            if sens is not None:
                row += tuple(f"{v:.3f}" for v in sens.rise[u.name]) if u.name in sens.rise else ("-",) * len(sens.ratios)
            rows.append(row)
        title = f"Allocation: {self.achieved:.3f} of the dense {self.metric} (target {self.target:.3f}), {self.method}"
        if self.round_to > 1:
            title += f", groups kept in multiples of {self.round_to} channels"
        return Table(title, headers, rows)

    def markdown(self) -> str:
        text = self.table().markdown()
        if self.sensitivity is not None:
            s = self.sensitivity
            text += (f"\nLoss rise: mean cross-entropy (nats) of {s.n_images} training images under {s.attack}, "
                     f"one unit pruned alone, over the unpruned model's {s.baseline:.3f}.\n")
        return text + (f"\n{self.reason}\n" if self.reason else "")


def _exact(name: str) -> str:
    """A glob that matches exactly this module name."""
    return re.sub(r"([*?\[])", r"[\1]", name)


class _Costs:
    """The exact cost of the shrunk model at per-unit ratios, cached by the channels each ratio keeps."""

    def __init__(self, model: nn.Module, example: torch.Tensor, units: list[Unit], shrink_cfg: ShrinkConfig, cost: Cost) -> None:
        self.model, self.example, self.units, self.shrink_cfg, self.cost = model, example, units, shrink_cfg, cost
        was_training = model.training
        self.dense = float(cost(model.eval()))
        model.train(was_training)
        self.cache: dict[tuple, float] = {}

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    def key(self, state: dict[str, float]) -> tuple:
        return tuple(u.kept(state[u.name]) for u in self.units)

    def __call__(self, state: dict[str, float]) -> float:
        key = self.key(state)
        if key not in self.cache:
            self.cache[key] = self._measure(state)
        return self.cache[key]

    def _measure(self, state: dict[str, float]) -> float:
        # The projector's hard projection with each unit at its ratio: the masks of Projector.masks, all taken
        # from the dense weights before any is applied, as hard_prune does.
        pruned = copy.deepcopy(self.model)
        params = dict(pruned.named_parameters())
        masks: dict[str, torch.Tensor] = {}
        for unit in self.units:
            masks.update(unit.at(state[unit.name]).masks(params, params))
        MaskSet(pruned, masks).apply()
        return float(self.cost(shrink(pruned, self.example, self.shrink_cfg).model))


def _bisect(costs: _Costs, state: dict[str, float], unit: Unit, lo: float, hi: float, goal: float) -> dict[str, float]:
    """``state`` with ``unit`` at the least ratio in [lo, hi] whose cost is within the goal (the cost at hi is)."""
    def at(ratio: float) -> dict[str, float]:
        return {**state, unit.name: ratio}

    if costs(at(lo)) <= goal:
        return at(lo)
    if unit.size is not None:  # over the widths it can keep: exact, and no shrink is spent twice on one width
        widths = [w for w in unit.widths if unit.kept(hi) <= w <= unit.kept(lo)]
        few, many = 0, len(widths) - 1
        while many - few > 1:
            mid = (few + many) // 2
            if costs(at(unit.ratio_keeping(widths[mid]))) <= goal:
                few = mid
            else:
                many = mid
        return at(unit.ratio_keeping(widths[few]))
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if costs(at(mid)) <= goal else (mid, hi)
    return at(hi)


def _fill(costs: _Costs, state: dict[str, float], free: list[Unit], shares: dict[str, float], goal: float) -> dict[str, float]:
    """Give back channels while the cost is more than BAND under the goal: one channel of a coarse unit can
    be a few percent of the whole model. The finest-grained unit (least cost per channel) that can close
    the gap alone gives back just enough; only if none can, whole units are given back, finest first."""
    def short(s: dict[str, float]) -> bool:
        return costs(s) < goal * (1 - BAND)

    if not short(state):
        return state
    grained = sorted((u for u in free if u.size is not None and state[u.name] > 0 and shares[u.name] > 0),
                     key=lambda u: shares[u.name] / u.size)
    for unit in grained:
        if costs({**state, unit.name: 0.0}) > goal:
            return _bisect(costs, state, unit, 0.0, state[unit.name], goal)
    for unit in grained:
        state = _bisect(costs, state, unit, 0.0, state[unit.name], goal)
        if not short(state):
            break
    return state


SWAP_UNITS = 6  # the finest-grained units a swap search trades channels between
SWAP_STEPS = 4  # widths (channels, or steps of pruning.round_to) given back to one unit per trade, at most
SWAP_ROUNDS = 4


def _swap(costs: _Costs, state: dict[str, float], free: list[Unit], shares: dict[str, float], goal: float) -> dict[str, float]:
    """When whole channels still leave the cost more than BAND under the goal, trade them between units:
    a few channels given back to one unit, and just enough pruned from another to stay within the goal;
    a trade is kept when it brings the cost closer to the goal. Two coarse groups (a small CNN's 16 and 32
    channels) often reach the goal only by such a trade; the greedy and the fill move one unit at a time.
    At most SWAP_ROUNDS x SWAP_UNITS^2 x SWAP_STEPS bisections, and only when the cost is short."""
    grained = sorted((u for u in free if u.size is not None and shares[u.name] > 0),
                     key=lambda u: shares[u.name] / u.size)[:SWAP_UNITS]
    for _ in range(SWAP_ROUNDS):
        if costs(state) >= goal * (1 - BAND):
            break
        candidates = []
        for give in grained:
            kept = give.kept(state[give.name])
            for wider in [w for w in give.widths if w > kept][:SWAP_STEPS]:
                back = {**state, give.name: give.ratio_keeping(wider)}
                if costs(back) <= goal:
                    candidates.append(back)
                    continue
                for take in grained:
                    if take is not give and costs({**back, take.name: take.most}) <= goal:
                        candidates.append(_bisect(costs, back, take, state[take.name], take.most, goal))
        better = [c for c in candidates if costs(state) < costs(c) <= goal]
        if not better:
            break
        state = max(better, key=costs)
    return state


def _uniform(costs: _Costs, base: dict[str, float], free: list[Unit], goal: float) -> dict[str, float]:
    """One ratio for every free unit: the least whose cost is within the goal, by bisection over the ratios
    at which some group's width changes (every distinct model once, each ratio a short decimal)."""
    def at(ratio: float) -> dict[str, float]:
        return {**base, **{u.name: min(ratio, u.most) for u in free}}

    groups = [u for u in free if u.size is not None]
    if not groups:  # only units pruned per layer (column, irregular): no channel widths to step through
        low, high = 0.0, max(u.most for u in free)
        for _ in range(16):
            mid = (low + high) / 2
            low, high = (low, mid) if costs(at(mid)) <= goal else (mid, high)
        neat = min(math.ceil(high * 1e4) / 1e4, max(u.most for u in free))  # pruning a little more stays within the goal
        return at(neat) if costs(at(neat)) <= goal else at(high)
    ratios = sorted({u.ratio_keeping(k) for u in groups for k in u.widths})
    lo, hi = 0, len(ratios) - 1  # cost at ratios[0] = 0 is over the goal, at the last within it: checked by the caller
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cost = costs(at(ratios[mid]))
        lo, hi = (lo, mid) if cost <= goal else (mid, hi)
        if goal * (1 - BAND) <= cost <= goal:
            break
    return at(ratios[hi])


def _ladder(unit: Unit, sensitivity: Sensitivity) -> list[tuple[float, float, bool]]:
    """(ratio, loss rise, measured) from 0 up to the unit's most pruning, one entry per distinct width.

    Beyond the last measured ratio the rise is extrapolated from the last measured slope; the greedy
    takes such steps only after every measured one.
    """
    if unit.name not in sensitivity.rise:
        raise RapcError(f"the sensitivity has no measurement of {unit.name}; it was measured for another model or "
                        f"pruning config: measure it again")
    ladder, seen = [(0.0, 0.0, True)], {unit.kept(0.0)}
    for ratio, rise in zip(sensitivity.ratios, sensitivity.rise[unit.name]):
        ratio = min(ratio, unit.most)
        if unit.kept(ratio) not in seen:
            seen.add(unit.kept(ratio))
            ladder.append((ratio, rise, True))
    if unit.kept(unit.most) not in seen:
        (x0, y0, _), (x1, y1, _) = ladder[-2] if len(ladder) > 1 else ladder[-1], ladder[-1]
        slope = max((y1 - y0) / (x1 - x0), 0.0) if x1 > x0 else 0.0
        ladder.append((unit.most, y1 + slope * (unit.most - x1), False))
    return ladder


def _greedy(costs: _Costs, base: dict[str, float], free: list[Unit], goal: float, sensitivity: Sensitivity) -> dict[str, float]:
    """The least summed loss rise that meets the goal: steps up the units' ladders, cheapest rise per cost saved first."""
    ladders = {u.name: _ladder(u, sensitivity) for u in free}
    base_cost = costs(base)
    # Each unit's saving measured alone; summed, they estimate a state's cost. Savings of coupled units
    # overlap (pruning a conv's inputs and outputs saves less than the two alone), so the estimate is
    # corrected by an exact measurement whenever it reaches the goal.
    saving = {u.name: [base_cost - costs({**base, u.name: r}) for r, _, _ in ladders[u.name]] for u in free}
    state, pos = dict(base), {u.name: 0 for u in free}
    offset, last = 0.0, None
    while True:
        estimate = base_cost - sum(saving[n][i] for n, i in pos.items()) + offset
        if estimate <= goal:
            exact = costs(state)
            offset += exact - estimate
            if exact <= goal:
                break
        best = None
        for unit in free:
            ladder, i = ladders[unit.name], pos[unit.name]
            for j in range(i + 1, len(ladder)):
                saved = saving[unit.name][j] - saving[unit.name][i]
                if saved > 0:
                    key = (not ladder[j][2], (ladder[j][1] - ladder[i][1]) / saved)
                    if best is None or key < best[0]:
                        best = (key, unit, j)
        if best is None:  # every unit as far as its ladder goes
            break
        _, unit, j = best
        last = (unit, state[unit.name], ladders[unit.name][j][0])
        pos[unit.name], state[unit.name] = j, ladders[unit.name][j][0]
    if costs(state) > goal:  # only when the estimate and the costs disagree about which steps save: the floor meets it
        return {**base, **{u.name: u.most for u in free}}
    return _bisect(costs, state, *last, goal) if last else state


def _unreachable(nearest: float, target: float, metric: str, model: nn.Module, projector: Projector,
                 units: list[Unit], pruning: PruningConfig, shrink_cfg: ShrinkConfig) -> str:
    plans = layer_plans(model, pruning)
    kept = [f"keep_dense {n}" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and n not in plans and any(fnmatch(n, p) for p in pruning.keep_dense)]
    kept += [note for note in projector.notes if "left dense" in note]
    kept += [f"pruning.layers fixes {u.name} at {u.fixed:g}" for u in units if u.fixed is not None]
    per_layer: dict[str, list[str]] = {}
    for u in units:
        if u.size is None:
            per_layer.setdefault(plans[u.layers[0]].scheme, []).append(u.name)
    kept += [f"the {scheme} scheme's zeros mostly stay in the shrunk model ({', '.join(names)})" for scheme, names in per_layer.items()]
    if pruning.round_to > 1:
        kept.append(f"pruning.round_to={pruning.round_to} keeps at least {pruning.round_to} channels of every group")
    if shrink_cfg.round_to > 1:
        kept.append(f"shrink.round_to={shrink_cfg.round_to} keeps widths multiples of {shrink_cfg.round_to}")
    return (f"target {target:.3f} of the dense {metric} is out of reach; the nearest is {nearest:.3f}, with every allocated "
            f"unit pruned as far as it goes (one channel, or pruning.round_to, kept per coupled group). What stays: {'; '.join(kept) or 'nothing else'}")


def allocate(
    model: nn.Module, example: torch.Tensor, pruning: PruningConfig, shrink_cfg: ShrinkConfig, cost: Cost,
    sensitivity: Sensitivity | None = None, reporter: Reporter | None = None,
) -> Allocation:
    """Per-layer ratios that keep ``pruning.target.fraction`` of the dense cost, measured by ``cost`` on the shrunk model.

    ``model`` holds the dense weights (they decide which channels a measurement prunes, not how
    many, so they do not change the answer for macs or params). Units whose ratio a user's
    pruning.layers rule sets keep it; keep_dense layers and the output layer stay dense, as the
    projector decides. Sensitivity allocation needs ``sensitivity`` and pruning.allocation other
    than "uniform"; otherwise the allocation is uniform. A target out of reach gives the nearest
    allocation and the reason.
    """
    if pruning.target is None:
        raise RapcError("pruning.target is not set: there is no budget to allocate")
    reporter = reporter or SilentReporter()
    started = time.perf_counter()
    metric, target = pruning.target.metric, pruning.target.fraction
    method = "uniform" if sensitivity is None or pruning.allocation == "uniform" else "sensitivity"
    projector = Projector(model, example, pruning)
    units = allocation_units(model, projector, pruning)
    free = [u for u in units if u.fixed is None]
    base = {u.name: u.fixed if u.fixed is not None else 0.0 for u in units}
    costs = _Costs(model, example, units, shrink_cfg, cost)
    goal = target * costs.dense
    floor = {**base, **{u.name: u.most for u in free}}
    shares = {u.name: (costs(base) - costs({**base, u.name: u.most})) / costs.dense for u in free}
    reason = None
    if costs(floor) > goal:
        state = floor
        if costs(floor) > goal * (1 + TOLERANCE):
            reason = _unreachable(costs(floor) / costs.dense, target, metric, model, projector, units, pruning, shrink_cfg)
    elif costs(base) <= goal:
        state = base
        if costs(base) < goal * (1 - TOLERANCE):
            reason = (f"the ratios fixed by pruning.layers alone keep {costs(base) / costs.dense:.3f} of the dense {metric}, "
                      f"under the target {target:.3f}; the other units stay dense")
    else:
        state = _uniform(costs, base, free, goal) if method == "uniform" else _greedy(costs, base, free, goal, sensitivity)
        state = _fill(costs, state, free, shares, goal)
        if method == "sensitivity":  # uniform keeps its one ratio (the fill may move one unit off it)
            state = _swap(costs, state, free, shares, goal)
        if costs(state) < goal * (1 - TOLERANCE):
            step = f"{pruning.round_to} channels (pruning.round_to)" if pruning.round_to > 1 else "whole channels"
            reason = (f"the cost moves in steps of {step} here: the nearest at or under the target {target:.3f} "
                      f"keeps {costs(state) / costs.dense:.3f} of the dense {metric}")
    choices = [UnitChoice(u.name, list(u.layers), state[u.name], u.size, u.kept(state[u.name]) if u.size else None,
                          None if u.fixed is not None else shares[u.name], u.fixed is not None) for u in units]
    allocation = Allocation(
        metric, target, costs(state) / costs.dense, costs.dense, costs(state), method,
        {layer: state[u.name] for u in units for layer in u.layers}, choices, reason, sensitivity,
        costs.evaluations, time.perf_counter() - started, pruning.round_to,
    )
    reporter.log(f"allocation: {allocation.achieved:.3f} of the dense {metric} (target {target:.3f}), {method}, "
                 f"{allocation.evaluations} shrunk models in {allocation.seconds:.1f}s")
    if reason:
        reporter.log(f"warning: {reason}")
    return allocation
