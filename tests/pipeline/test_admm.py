import json

import torch

from rapc.config import AdmmConfig, AttackConfig, OptimizerConfig, PruningConfig, ScheduleConfig, load_config
from rapc.data import loader
from rapc.pipeline.admm import HARD_PRUNE_LOSS, AdmmState, unconverged
from rapc.pipeline.compress import compress
from rapc.pipeline.loop import Hooks, Step, make_optimizer, make_schedule, train_epoch
from rapc.pipeline.projection import Projector
from rapc.schemes import filter_mask
from rapc.progress import SilentReporter


def test_update_follows_the_scaled_admm_equations():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), torch.nn.Linear(4, 3))
    projector = Projector(model, torch.rand(2, 6), PruningConfig(scheme="irregular", ratio=0.5))
    params = dict(model.named_parameters())
    state = AdmmState.start(params, projector, rho=0.5)
    w = params["0.weight"].detach().clone()
    assert torch.equal(state.z["0.weight"], w * (w.abs() >= w.abs().flatten().sort().values[12]))
    with torch.no_grad():
        params["0.weight"].add_(0.1)
    u_old = state.u["0.weight"].clone()
    state.update(params, projector, AdmmConfig(rho_multiplier=2.0, rho_max=0.8))
    w_new = params["0.weight"].detach()
    shifted = w_new + u_old
    expected_z = shifted * (shifted.abs() >= shifted.abs().flatten().sort().values[12])
    assert torch.allclose(state.z["0.weight"], expected_z)
    assert torch.allclose(state.u["0.weight"], u_old + w_new - expected_z)
    assert state.rho == 0.8 and state.updates == 1  # multiplied, then capped


def test_penalty_is_half_rho_times_the_squared_distance_and_differentiable():
    w = torch.nn.Parameter(torch.randn(4, 3))
    z, u = torch.zeros(4, 3), torch.ones(4, 3)
    state = AdmmState({"w": z}, {"w": u}, rho=0.2)
    penalty = state.penalty({"w": w})
    assert torch.allclose(penalty, 0.1 * (w - z + u).pow(2).sum())
    penalty.backward()
    assert torch.allclose(w.grad, 0.2 * (w - z + u).detach())


def test_adversarial_admm_lowers_the_residual_to_the_filter_set(trained_lenet, digits):
    model = __import__("copy").deepcopy(trained_lenet).train()
    example = next(iter(loader(digits.val, 8, shuffle=False)))[0]
    projector = Projector(model, example, PruningConfig(scheme="filter", ratio=0.5))
    params = dict(model.named_parameters())
    state = AdmmState.start(params, projector, rho=0.5)
    before = state.residuals(params)
    data = loader(digits.train, 64, shuffle=True)
    optimizer = make_optimizer(model.parameters(), OptimizerConfig(name="sgd", lr=0.01, momentum=0.9))
    schedule = make_schedule(optimizer, ScheduleConfig(name="constant"), len(data), 4)
    for _ in range(4):
        train_epoch(model, data, Step(optimizer, schedule, AttackConfig(method="pgd", eps=0.05, steps=2),
                                      hooks=Hooks(penalty=lambda: state.penalty(params))))
        state.update(params, projector, AdmmConfig(rho_multiplier=1.3))
    after = state.residuals(params)
    assert set(after) == {"conv1", "conv2", "fc1"}
    assert all(after[k] < 0.5 * before[k] for k in before), (before, after)
    # The weights are now close to a filter-sparse set: hard pruning them removes little energy.
    w = params["conv2.weight"].detach()
    kept = w * filter_mask(w, 0.5)
    assert (w - kept).norm() / w.norm() < 0.5 * before["conv2"]


def _admm_end(robust: float) -> dict:
    return {"stage": "admm", "val_robust": robust, "residuals": {"conv1": 0.2, "fc1": 0.85}}


def test_a_hard_prune_that_loses_more_than_its_bound_is_called_an_unconverged_admm_naming_the_farthest_layer():
    pruned = {"stage": "hard_prune", "val_robust": 0.153, "val_attack": "PGD-20x2 step 0.0375"}
    warning = unconverged(_admm_end(0.447), pruned)
    assert warning.startswith("the hard prune cost 29 points of validation PGD-20x2 step 0.0375 accuracy (44.7% -> 15.3%)")
    assert "0.85 at fc1" in warning and "more admm epochs" in warning
    assert unconverged(_admm_end(0.153 + HARD_PRUNE_LOSS - 0.005), pruned) is None  # within the bound: retraining recovers such losses
    assert unconverged(_admm_end(0.10), pruned) is None  # a prune that gained


def test_the_compressed_runs_summary_and_log_carry_the_unconverged_admm_warning(tmp_path, monkeypatch):
    monkeypatch.setattr("rapc.pipeline.admm.HARD_PRUNE_LOSS", -1.0)  # any prune is a loss beyond it: the wiring, not the bound
    logged: list[str] = []
    reporter = SilentReporter()
    monkeypatch.setattr(reporter, "log", logged.append)
    cfg = load_config("digits-lenet-filter", ["stages.pretrain.epochs=1", "stages.pretrain.clean_epochs=1", "stages.pretrain.eps_ramp_epochs=0",
                                              "stages.admm.epochs=1", "stages.retrain.epochs=1", "stages.dense_control=false",
                                              "eval.n_ensemble=10"])
    result = compress(cfg, tmp_path / "run", reporter)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["warnings"][0].startswith("compressed: the hard prune cost") and result.warnings == summary["warnings"]
    assert any(line.startswith("warning: the hard prune cost") for line in logged)
