"""A run's budget (pruning.target) solved once into per-layer ratios, saved in the run and reused;
params and latency targets through the whole pipeline."""

import json

import pytest
import torch

from rapc.bench.latency import latency_cost
from rapc.config import TargetConfig
from rapc.errors import RapcError
from rapc.modelio import Architecture, load_model
from rapc.pipeline.budget import ALLOCATION, budgeted, target_cost
from rapc.pipeline.compress import compress
from rapc.pipeline.distributed import Ranks
from rapc.progress import SilentReporter
from rapc.rundir import RunDir


def _short(cfg, **target):
    cfg = cfg.model_copy(deep=True)
    cfg.stages.pretrain.epochs, cfg.stages.admm.epochs, cfg.stages.retrain.epochs = 2, 1, 1
    cfg.eval.n_val, cfg.eval.n_test, cfg.eval.n_ensemble = 100, 100, 10
    cfg.pruning.target = TargetConfig(**target)
    return cfg


def test_the_allocation_is_solved_once_saved_in_the_run_and_reused(digits_cfg, digits, trained_lenet, tmp_path):
    cfg = _short(digits_cfg, macs=0.5)
    cfg.model.width = 8  # as trained_lenet
    cfg.pruning.allocation = "uniform"
    run = RunDir(tmp_path / "run")
    run.start(cfg)
    example = Architecture.for_data(cfg.model, digits.info).example()
    pruning, allocation = budgeted(cfg, trained_lenet, digits, example, run, SilentReporter(), Ranks())
    saved = run.allocation / ALLOCATION
    assert saved.is_file() and (run.allocation / "allocation.md").is_file()
    assert abs(allocation.achieved / 0.5 - 1) <= 0.02 and allocation.method == "uniform"
    assert {rule.pattern: rule.ratio for rule in pruning.layers} == allocation.ratios
    assert [r["stage"] for r in map(json.loads, run.metrics.read_text().splitlines())] == ["allocation"]
    # A resumed run reads the file instead of solving again: an edited ratio comes back as written.
    record = json.loads(saved.read_text())
    record["ratios"]["conv1"] = 0.125
    saved.write_text(json.dumps(record))
    again, _ = budgeted(cfg, trained_lenet, digits, example, run, SilentReporter(), Ranks())
    assert {rule.pattern: rule.ratio for rule in again.layers}["conv1"] == 0.125


def test_no_target_leaves_the_pruning_config_as_it_is(digits_cfg, digits, trained_lenet, tmp_path):
    run = RunDir(tmp_path / "run")
    run.start(digits_cfg)
    pruning, allocation = budgeted(digits_cfg, trained_lenet, digits, torch.rand(2, 1, 8, 8), run, SilentReporter(), Ranks())
    assert pruning is digits_cfg.pruning and allocation is None and not run.allocation.exists()


def test_a_latency_target_needs_a_latency_measurement():
    with pytest.raises(RapcError, match="latency target is measured on rapc's bench backends"):
        target_cost(TargetConfig(latency=0.5), torch.rand(2, 1, 8, 8), None)


def test_a_params_target_is_met_through_the_whole_pipeline(digits_cfg, tmp_path):
    result = compress(_short(digits_cfg, params=0.25), tmp_path / "run")
    kept = result.compressed.params / result.dense.params
    assert abs(kept / 0.25 - 1) <= 0.02, kept
    assert result.budget["metric"] == "params" and result.budget["achieved"] == kept and result.budget["method"] == "uniform"  # the default
    assert load_model(result.run).state_dict().keys() == load_model(result.run / "dense").state_dict().keys()


def test_a_latency_target_is_solved_on_a_bench_backend_and_reported(digits_cfg, tmp_path):
    """Measured, so noisy: the solve's own figure is within 10% of the target or the reason says why not."""
    cfg = _short(digits_cfg, latency=0.5, backend="torch-eager", batch=64)
    cfg.pruning.allocation = "uniform"
    result = compress(cfg, tmp_path / "run", latency=latency_cost)
    budget = result.budget
    assert budget["metric"] == "latency" and budget["measured"] == "by the allocator before training"
    assert budget["reason"] is not None or abs(budget["achieved"] / 0.5 - 1) <= 0.1, budget
    assert result.compressed.macs < result.dense.macs
