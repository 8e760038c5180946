"""Where pruning starts when it does not start from rapc's own pretraining: a rapc run or model
directory, or a user's weights file, and the check that such a start is robust at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from rapc import judge
from rapc.config import Config, StagesConfig
from rapc.data import Splits, head, loader
from rapc.errors import RapcError
from rapc.modelio import WEIGHTS, load_weights, read_architecture, resolve_model_dir
from rapc.pipeline.distributed import Ranks
from rapc.progress import Reporter
from rapc.rundir import RunDir, RunPaths
from rapc.weights import load_weights_file, read_weights_file


def check_start_from(cfg: Config) -> None:
    """A start_from that is not there, or a weights file that cannot be read, fails before the run
    directory is made, not after the data loads."""
    start = cfg.stages.start_from
    if start is not None and not Path(start).exists():
        raise RapcError(f"stages.start_from: {start} does not exist")
    if cfg.stages.weights_file:
        read_weights_file(start)


def load_start(model: nn.Module, stages: StagesConfig) -> None:
    """The dense start: a user's weights file, or the dense model of a rapc run or model directory."""
    path = stages.start_from
    if stages.weights_file:
        load_weights_file(model, path)
        return
    dense = RunPaths(path).dense
    directory = dense if dense.is_dir() else resolve_model_dir(path)
    if read_architecture(directory).pruning_history:
        raise RapcError(f"stages.start_from: {directory} holds a pruned model; start from a dense one")
    load_weights(model, directory / WEIGHTS)


# Below this ensemble robust accuracy a start model is taken as not robust: pruning keeps robustness, it does not create it.
MIN_START_ROBUST = 0.05


def check_start(model: nn.Module, splits: Splits, cfg: Config, run: RunDir, reporter: Reporter, ranks: Ranks) -> None:
    """Judge the model pruning starts from (start_from, after any pretraining) on the first
    ``eval.n_start`` validation images, and refuse one that is not robust at the configured eps."""
    if not (cfg.stages.start_from and cfg.stages.check_start):
        return
    figures = ranks.from_main(lambda: _judge_start(model, splits, cfg, reporter))
    eps, label, n = cfg.attack.eval.eps, figures["robust_attack"], figures["n"]
    reporter.log(f"start model: clean {figures['clean']:.1%}, {label} {figures['robust']:.1%} (n={n})")
    if eps > 0 and figures["robust"] < MIN_START_ROBUST:
        raise RapcError(f"the start model holds {figures['robust']:.1%} of {label} at eps {eps:g} ({n} validation images): it is "
                        f"not robust, and pruning cannot keep robustness it does not have; train it adversarially first "
                        f"(`--set stages.pretrain.epochs=N`) or pass `--force`")
    run.write_start_check(figures)


def _judge_start(model: nn.Module, splits: Splits, cfg: Config, reporter: Reporter) -> dict[str, Any]:
    val = loader(head(splits.val, cfg.eval.n_start), cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.workers)
    protocol = judge.final_protocol(cfg.attack.eval, n_ensemble=None, seed=cfg.seed)
    verdict = judge.judge_loader(model, val, protocol, reporter=reporter, title="start model")
    return {"clean": verdict.clean.accuracy, "robust": verdict.robust.accuracy, "robust_attack": verdict.robust.label,
            "n": verdict.robust.n, "judge": verdict.to_dict()}


def given_model(stages: StagesConfig) -> str:
    """What the baseline is when it is the given weights themselves."""
    epochs = stages.pretrain.epochs
    here = f" (and here for {epochs} more pretraining epoch{'s' if epochs > 1 else ''})" if epochs else ""
    return (f"the given weights ({stages.start_from}), trained outside rapc{here}: their training budget is unknown, "
            f"so not budget-matched")
