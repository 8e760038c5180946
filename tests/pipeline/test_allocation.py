"""Budgets into per-layer ratios: real LeNets and ResNets, the real projector, torch-pruning's shrink
and its MAC and parameter counts; the sensitivity on a LeNet adversarially trained on digits."""

from __future__ import annotations

import copy
import json
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from rapc.attacks import perturb
from rapc.config import AttackConfig, DataConfig, LayerRule, ModelConfig, PruningConfig, SensitivityConfig, ShrinkConfig, TargetConfig
from rapc.data import load_data, loader
from rapc.measure import macs_and_params
from rapc.modelio import Architecture
from rapc.models import create_model
from rapc.pipeline.allocation import TOLERANCE, Allocation, allocate, metric_cost, shrunk_cost
from rapc.pipeline.allocation_plot import plot_sensitivity
from rapc.pipeline.masks import hard_prune
from rapc.pipeline.projection import Projector, layer_plans
from rapc.pipeline.sensitivity import Sensitivity, sensitivity
from rapc.pipeline.shrink import shrink

ATTACK = AttackConfig(method="pgd", eps=0.1, steps=5)


def _lenet(size: int = 8, width: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lenet", num_classes=10, in_channels=1, image_size=size, width=width, mean=[0.3], std=[0.4]).eval()


def _pruning(scheme: str, metric: str, fraction: float, allocation: str = "sensitivity", **kwargs) -> PruningConfig:
    return PruningConfig(scheme=scheme, target=TargetConfig(**{metric: fraction}), allocation=allocation, **kwargs)


def _adversarial_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    start = torch.empty(x.shape).uniform_(-ATTACK.eps, ATTACK.eps, generator=torch.Generator().manual_seed(1))
    adversarial = perturb(model, x, y, ATTACK, start=start)
    with torch.no_grad():
        return float(F.cross_entropy(model(adversarial), y))


def _assert_exact(allocation: Allocation, model, example, pruning: PruningConfig, cost) -> None:
    """The reported cost is what the pipeline's own path (projector, hard prune, shrink) gives with the rules applied."""
    assert allocation.cost == shrunk_cost(model, example, allocation.apply(pruning), ShrinkConfig(), cost)
    assert allocation.achieved == pytest.approx(allocation.cost / allocation.dense_cost)


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(name="digits"), seed=0)


@pytest.fixture(scope="module")
def robust_lenet(digits):
    """LeNet w=16 on digits: one clean epoch, then two of PGD training (about two seconds)."""
    torch.manual_seed(0)
    model = Architecture.for_data(ModelConfig(name="lenet", width=16), digits.info).build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(3):
        for x, y in loader(digits.train, 64, shuffle=True, seed=epoch):
            if epoch:
                x = perturb(model, x, y, AttackConfig(eps=0.1, steps=3, step=0.05))
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def train_batch(digits):
    return next(iter(loader(digits.train, 256, shuffle=False)))


@pytest.fixture(scope="module")
def sensitivities(robust_lenet, train_batch) -> dict[str, Sensitivity]:
    x, y = train_batch
    return {scheme: sensitivity(robust_lenet, x[:2], PruningConfig(scheme=scheme), x, y, ATTACK) for scheme in ("filter", "channel")}


@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("scheme", ["filter", "channel"])
def test_uniform_allocation_meets_the_target_with_one_ratio_for_every_unit(scheme, metric):
    model, example = _lenet(), torch.rand(2, 1, 8, 8)
    for fraction in (0.3, 0.6):
        pruning = _pruning(scheme, metric, fraction, allocation="uniform")
        cost = metric_cost(metric, example)
        allocation = allocate(model, example, pruning, ShrinkConfig(), cost)
        assert allocation.method == "uniform" and allocation.reason is None
        assert allocation.met and allocation.achieved <= fraction, allocation.achieved
        _assert_exact(allocation, model, example, pruning, cost)
        # One ratio everywhere, but for at most one unit trimmed to fill the gap one coarse channel leaves.
        ratios = [u.ratio for u in allocation.units if u.channels]
        assert len(set(ratios)) <= 2 and sum(r != statistics.mode(ratios) for r in ratios) <= 1, ratios


def test_an_mnist_sized_lenet_is_solved_with_a_few_dozen_shrinks():
    model, example = _lenet(size=28), torch.rand(2, 1, 28, 28)
    pruning = _pruning("filter", "macs", 0.5, allocation="uniform")
    allocation = allocate(model, example, pruning, ShrinkConfig(), metric_cost("macs", example))
    assert allocation.met and allocation.evaluations <= 40
    dense_macs = macs_and_params(model, example)[0]
    assert allocation.dense_cost == dense_macs and abs(allocation.cost / dense_macs - 0.5) <= 0.5 * TOLERANCE


def test_pruning_a_unit_further_raises_its_adversarial_loss_more(sensitivities):
    for scheme, sens in sensitivities.items():
        assert sens.ratios == sorted(SensitivityConfig().ratios) and sens.n_images == 256 and sens.baseline > 0
        for unit, rises in sens.rise.items():
            if unit == "conv1" and scheme == "channel":
                # The network's single input channel is always kept: nothing changes, and with the same
                # random starts for every measurement the rise is exactly zero.
                assert rises == [0.0] * len(rises)
                continue
            assert all(b >= a - 0.05 for a, b in zip(rises, rises[1:])), (scheme, unit, rises)
            assert rises[-1] > rises[0] + 0.3, (scheme, unit, rises)


def test_sensitivity_is_reproducible_and_leaves_the_model_as_it_was(robust_lenet, train_batch):
    x, y = train_batch
    before = {k: v.clone() for k, v in robust_lenet.state_dict().items()}
    pruning = PruningConfig(scheme="filter", sensitivity=SensitivityConfig(n_images=64, ratios=[0.5, 0.9]))
    first = sensitivity(robust_lenet, x[:2], pruning, x, y, ATTACK)
    assert first == sensitivity(robust_lenet, x[:2], pruning, x, y, ATTACK) and first.n_images == 64
    assert all(torch.equal(before[k], v) for k, v in robust_lenet.state_dict().items())
    assert set(first.rise) == {"conv1", "conv2", "fc1"}  # fc2 is the output layer: no unit


@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("scheme", ["filter", "channel"])
def test_sensitivity_allocation_meets_the_target_with_other_ratios_than_uniform(scheme, metric, robust_lenet, sensitivities, digits):
    example = torch.rand(2, 1, 8, 8)
    cost = metric_cost(metric, example)
    sens = sensitivities[scheme]
    chosen = {}
    for method in ("uniform", "sensitivity"):
        pruning = _pruning(scheme, metric, 0.4, allocation=method)
        chosen[method] = allocation = allocate(robust_lenet, example, pruning, ShrinkConfig(), cost, sens)
        assert allocation.method == method and allocation.met and allocation.achieved <= 0.4, allocation.achieved
        _assert_exact(allocation, robust_lenet, example, pruning, cost)
    uniform, sensitive = (chosen[m].ratios for m in ("uniform", "sensitivity"))
    assert max(abs(uniform[n] - sensitive[n]) for n in uniform) > 0.1, (uniform, sensitive)
    # One-shot pruned at these ratios, the sensitivity allocation is not less robust on held-out images.
    x, y = next(iter(loader(digits.val, 300, shuffle=False)))
    losses = {}
    for method, allocation in chosen.items():
        pruned = copy.deepcopy(robust_lenet)
        hard_prune(pruned, Projector(pruned, example, allocation.apply(_pruning(scheme, metric, 0.4))))
        losses[method] = _adversarial_loss(pruned, x, y)
    assert losses["sensitivity"] <= losses["uniform"] + 0.05, losses


@pytest.mark.parametrize("method", ["uniform", "sensitivity"])
def test_round_to_allocations_keep_multiples_of_n_and_meet_the_target_through_the_pipelines_path(method, robust_lenet, train_batch):
    """LeNet w=16 (conv1 32, conv2 64, fc1 1024 channels) in steps of 8 channels: the solve steps through the
    widths the projector can keep, and its cost is what the projector, hard prune and shrink then make."""
    x, y = train_batch
    example = x[:2]
    cost = metric_cost("macs", example)
    pruning = _pruning("filter", "macs", 0.4, allocation=method, round_to=8)
    sens = sensitivity(robust_lenet, example, pruning, x, y, ATTACK) if method == "sensitivity" else None
    allocation = allocate(robust_lenet, example, pruning, ShrinkConfig(), cost, sens)
    assert allocation.met and allocation.achieved <= 0.4 and allocation.reason is None, allocation.achieved
    assert allocation.round_to == 8 and "multiples of 8 channels" in allocation.table().title
    assert all(u.kept % 8 == 0 and u.kept < u.channels for u in allocation.units), [(u.name, u.kept) for u in allocation.units]
    _assert_exact(allocation, robust_lenet, example, pruning, cost)
    projected = {"+".join(sorted({s.layer for s in u.slots})): u.kept for u in Projector(robust_lenet, example, allocation.apply(pruning)).units}
    assert projected == {u.name: u.kept for u in allocation.units}
    plain = allocate(robust_lenet, example, _pruning("filter", "macs", 0.4, allocation=method), ShrinkConfig(), cost, sens)
    assert any(u.kept % 8 for u in plain.units)  # without round_to this budget lands off the multiples


def test_round_to_sets_the_floor_of_an_unreachable_target_and_says_so():
    model, example = _lenet(), torch.rand(2, 1, 8, 8)
    allocation = allocate(model, example, _pruning("filter", "macs", 0.02, allocation="uniform", round_to=8), ShrinkConfig(),
                          metric_cost("macs", example))
    assert not allocation.met and all(u.kept == 8 for u in allocation.units)
    assert "pruning.round_to=8 keeps at least 8 channels of every group" in allocation.reason


def test_user_ratios_and_keep_dense_layers_are_left_as_the_user_set_them(robust_lenet, sensitivities):
    example = torch.rand(2, 1, 8, 8)
    pruning = _pruning("filter", "macs", 0.65, keep_dense=["conv1"], layers=[LayerRule(pattern="conv2", ratio=0.25)])
    allocation = allocate(robust_lenet, example, pruning, ShrinkConfig(), metric_cost("macs", example), sensitivities["filter"])
    assert allocation.met and allocation.reason is None
    assert "conv1" not in allocation.ratios and "fc2" not in allocation.ratios  # keep_dense, and the output layer
    assert allocation.ratios["conv2"] == 0.25 and next(u for u in allocation.units if u.name == "conv2").fixed
    assert allocation.ratios["fc1"] > 0.25  # the allocator solved the rest
    plans = layer_plans(robust_lenet, allocation.apply(pruning))
    assert "conv1" not in plans and plans["conv2"].ratio == 0.25 and plans["fc1"].ratio == allocation.ratios["fc1"]


def test_coupled_layers_share_one_ratio_and_a_resnet_takes_about_a_hundred_shrinks():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=3, image_size=16, width=1, mean=[0.5] * 3, std=[0.25] * 3).eval()
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 10, (16,))
    pruning = _pruning("filter", "macs", 0.5)
    sens = sensitivity(model, x[:2], pruning, x, y, AttackConfig(eps=0.03, steps=1))
    allocation = allocate(model, x[:2], pruning, ShrinkConfig(), metric_cost("macs", x[:2]), sens)
    assert allocation.met and allocation.evaluations <= 12 * 6 + 40, allocation.evaluations
    stage1 = [allocation.ratios[n] for n in ("conv1", "layer1.0.conv2", "layer1.1.conv2")]  # one residual chain
    assert len(set(stage1)) == 1 and any(u.layers == ["conv1", "layer1.0.conv2", "layer1.1.conv2"] for u in allocation.units)
    applied = allocation.apply(pruning)
    plans = layer_plans(model, applied)
    assert all(plans[n].ratio == unit.ratio for unit in allocation.units for n in unit.layers)
    projected = {tuple(sorted({s.layer for s in unit.slots})): unit.ratio for unit in Projector(model, x[:2], applied).units}
    assert projected == {tuple(sorted(u.layers)): u.ratio for u in allocation.units}


def test_an_unreachable_target_gives_the_nearest_allocation_and_says_why():
    model, example = _lenet(), torch.rand(2, 1, 8, 8)
    cost = metric_cost("macs", example)
    allocation = allocate(model, example, _pruning("filter", "macs", 0.02, allocation="uniform", keep_dense=["conv2"]), ShrinkConfig(), cost)
    assert not allocation.met and allocation.achieved > 0.02
    assert "out of reach" in allocation.reason and "keep_dense conv2" in allocation.reason and "fc2: output layer" in allocation.reason
    assert all(u.kept == 1 for u in allocation.units)  # the nearest: every unit as far as it goes
    irregular = allocate(model, example, _pruning("irregular", "macs", 0.5, allocation="uniform"), ShrinkConfig(), cost)
    # Even at 99% of its weights pruned, only the filters left all zero can go: far from half the MACs.
    assert irregular.achieved > 0.6 and "irregular scheme's zeros mostly stay in the shrunk model (conv1, conv2, fc1, fc2)" in irregular.reason


def test_an_allocation_round_trips_through_json_and_applies_as_exact_rules(robust_lenet, sensitivities, tmp_path):
    example = torch.rand(2, 1, 8, 8)
    pruning = _pruning("filter", "params", 0.5)
    allocation = allocate(robust_lenet, example, pruning, ShrinkConfig(), metric_cost("params", example), sensitivities["filter"])
    again = Allocation.from_dict(json.loads(json.dumps(allocation.to_dict())))
    assert again == allocation and again.apply(pruning) == allocation.apply(pruning)
    applied = allocation.apply(pruning)
    assert applied.layers[-len(allocation.ratios):] == [LayerRule(pattern=n, ratio=r) for n, r in allocation.ratios.items()]
    assert pruning.layers == []  # the given config is not changed
    text = allocation.markdown()
    for unit in allocation.units:
        assert f"| {unit.name} | {unit.ratio:.4g} |" in text
    png = plot_sensitivity(allocation, tmp_path / "sensitivity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_latency_target_is_solved_with_the_cost_it_is_given():
    """A deterministic stand-in for a bench runner: a fixed overhead plus time per MAC. The overhead
    does not shrink, so the MACs must shrink further than the latency."""
    model, example = _lenet(), torch.rand(2, 1, 8, 8)

    def latency(m: torch.nn.Module) -> float:
        return 2e-4 + 1e-9 * macs_and_params(m, example)[0]

    allocation = allocate(model, example, _pruning("filter", "latency", 0.6, allocation="uniform"), ShrinkConfig(), latency)
    assert allocation.metric == "latency" and allocation.met
    macs = (allocation.cost - 2e-4) / (allocation.dense_cost - 2e-4)
    assert macs < allocation.achieved - 0.05


def test_a_latency_target_with_real_cpu_timing_makes_a_faster_model():
    model, example = _lenet(size=28), torch.rand(2, 1, 28, 28)
    batch = torch.rand(16, 1, 28, 28)

    @torch.no_grad()
    def latency(m: torch.nn.Module, repeats: int = 7) -> float:
        """The fastest of a few runs: other processes on the machine only ever add time."""
        m(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            m(batch)
            times.append(time.perf_counter() - start)
        return min(times)

    pruning = _pruning("filter", "latency", 0.5, allocation="uniform")
    allocation = allocate(model, example, pruning, ShrinkConfig(), latency)
    pruned = copy.deepcopy(model)
    hard_prune(pruned, Projector(pruned, example, allocation.apply(pruning)))
    small = shrink(pruned, example, ShrinkConfig()).model
    ratio = statistics.median(latency(small) / latency(model) for _ in range(5))  # compared within one run
    assert allocation.achieved <= 0.5 * (1 + TOLERANCE) and 0.1 < ratio < 0.85, (allocation.achieved, ratio)
