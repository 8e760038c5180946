"""A run's whole-model budget (``pruning.target``) turned into per-layer ratios, once.

The allocation is solved on the model pruning starts from (after pretraining or start_from),
written to the run's ``allocation/`` (the ratios, their table and the sensitivity plot) and
reused on resume, so an interrupted run prunes to the same ratios it started with. The ratios
go into the pruning config as exact-name layer rules: ADMM, masks and shrink stay as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from torch import nn

from rapc.config import Config, PruningConfig, TargetConfig
from rapc.data import Splits, first
from rapc.errors import RapcError
from rapc.pipeline.allocation import Allocation, Cost, allocate, metric_cost
from rapc.pipeline.allocation_plot import plot_sensitivity
from rapc.pipeline.distributed import Ranks
from rapc.pipeline.sensitivity import sensitivity
from rapc.progress import Reporter
from rapc.results import ModelResult
from rapc.rundir import RunDir, RunPaths, atomic_write

# How a latency target is measured: (backend name, batch, image shape) -> the cost of a model in ms.
# Latency is measured by rapc's bench backends, which the pipeline cannot import; the CLI passes
# rapc.bench.latency.latency_cost.
LatencyCost = Callable[[str, int, tuple[int, ...]], Cost]

ALLOCATION = "allocation.json"


def budgeted(cfg: Config, model: nn.Module, splits: Splits, example: torch.Tensor, run: RunDir, reporter: Reporter,
             ranks: Ranks, latency: LatencyCost | None = None) -> tuple[PruningConfig, Allocation | None]:
    """The pruning config to project with (``cfg.pruning``, or its allocation for a target) and the allocation."""
    if cfg.pruning.target is None:
        return cfg.pruning, None
    saved = run.allocation / ALLOCATION
    record = ranks.from_main(lambda: json.loads(saved.read_text()) if saved.is_file()
                             else _solve(cfg, model, splits, example, run, reporter, latency))
    allocation = Allocation.from_dict(record)
    return allocation.apply(cfg.pruning), allocation


def saved_allocation(run: RunPaths) -> Allocation | None:
    """The allocation a run solved for its pruning.target, or None (no target)."""
    saved = run.allocation / ALLOCATION
    return Allocation.from_dict(json.loads(saved.read_text())) if saved.is_file() else None


def target_cost(target: TargetConfig, example: torch.Tensor, latency: LatencyCost | None) -> Cost:
    if target.metric != "latency":
        return metric_cost(target.metric, example[:1])
    if latency is None:
        raise RapcError("a latency target is measured on rapc's bench backends: run it through `rapc compress`, or pass "
                        "compress(..., latency=rapc.bench.latency.latency_cost)")
    return latency(target.backend, target.batch, tuple(example.shape[1:]))


def _solve(cfg: Config, model: nn.Module, splits: Splits, example: torch.Tensor, run: RunDir, reporter: Reporter,
           latency: LatencyCost | None) -> dict:
    pruning = cfg.pruning
    measured = None
    if pruning.allocation == "sensitivity":
        # Training images in a fixed order: the test split must not steer pruning.
        images, labels = first(splits.train, pruning.sensitivity.n_images, cfg.data.eval_batch_size)
        measured = sensitivity(model, example, pruning, images, labels, cfg.attack.train, reporter, seed=cfg.seed)
    allocation = allocate(model, example, pruning, cfg.shrink, target_cost(pruning.target, example, latency), measured, reporter)
    folder = run.allocation
    folder.mkdir(parents=True, exist_ok=True)
    record = allocation.to_dict()
    atomic_write(folder / "allocation.md", lambda tmp: tmp.write_text(allocation.markdown()))
    if measured is not None:
        plot_sensitivity(allocation, folder / "sensitivity.png")
    atomic_write(folder / ALLOCATION, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))  # last: marks it solved
    run.log({"stage": "allocation", "metric": allocation.metric, "target": allocation.target, "achieved": allocation.achieved,
             "method": allocation.method, "reason": allocation.reason, "seconds": allocation.seconds})
    return record


def budget_report(allocation: Allocation, dense: ModelResult, compressed: ModelResult) -> dict:
    """Target vs achieved for the summary. MACs and params are counted again on the final models
    (ADMM keeps the allocated widths, so they match the solve); latency is the solve's own
    measurement, to be confirmed by `rapc bench` on the served model."""
    metric = allocation.metric
    achieved = compressed.size(metric) / dense.size(metric) if metric in ("macs", "params") else allocation.achieved
    return {"metric": metric, "target": allocation.target, "achieved": achieved, "method": allocation.method,
            "reason": allocation.reason, "ratios": allocation.ratios, "round_to": allocation.round_to,
            "measured": "on the final models" if metric in ("macs", "params") else "by the allocator before training"}
