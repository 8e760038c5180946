"""``rapc compress``: dense adversarial training -> adversarial ADMM -> hard prune ->
masked adversarial retraining -> physical shrink, written to one run directory, then the
judge's verdict on it (rapc.pipeline.report).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from rapc.config import Config
from rapc.device import resolve_device
from rapc.errors import RapcError
from rapc.measure import compare_layers, layer_stats, sparsity
from rapc.modelio import ARCHITECTURE, WEIGHTS, Architecture, load_weights, save_model
from rapc.pipeline.admm import AdmmSchedule, AdmmState
from rapc.pipeline.budget import LatencyCost, budgeted
from rapc.pipeline.distill import distillation
from rapc.pipeline.distributed import Ranks, env_rank, session
from rapc.pipeline.loop import Hooks
from rapc.pipeline.masks import hard_prune
from rapc.pipeline.parts import RunParts
from rapc.pipeline.projection import Projector
from rapc.pipeline.report import Summary, Trained, admm_warning, finished, report
from rapc.pipeline.shrink import shrink
from rapc.pipeline.start_model import check_start, check_start_from, given_model, load_start
from rapc.pipeline.trainer import Trainer
from rapc.pipeline.training_module import training_module
from rapc.progress import Reporter, SilentReporter
from rapc.rundir import ReadOnlyRunDir, RunDir, open_run


STAGES = ("pretrain", "admm", "retrain", "dense-admm", "dense-retrain")  # in the order they run


def compress(cfg: Config, out: str | Path, reporter: Reporter | None = None, latency: LatencyCost | None = None) -> Summary | None:
    """Train a new run in ``out`` (:func:`train`), then judge it (:func:`rapc.pipeline.report.report`).

    Under torchrun every rank calls this; rank 0 judges and returns the summary, the others return None.
    ``latency`` measures a latency target (rapc.bench.latency.latency_cost).
    """
    root = train(cfg, out, reporter, latency)
    return None if root is None else report(root, reporter)


def resume(out: str | Path, reporter: Reporter | None = None, latency: LatencyCost | None = None) -> Summary | None:
    """Continue the interrupted run in ``out``: training from its last checkpoints, then the judge
    (a verdict saved before the interruption is kept). A run that had already finished is only
    re-read. Under torchrun every rank calls this; rank 0 returns the summary, the others None."""
    if (done := finished(out)) is not None:
        return done if env_rank() == 0 else None
    root = resume_training(out, reporter, latency)
    return None if root is None else report(root, reporter)


def train(cfg: Config, out: str | Path, reporter: Reporter | None = None, latency: LatencyCost | None = None) -> Path | None:
    """Run the training pipeline in a new run directory ``out``, up to its saved dense and compressed
    models and trained.json; the judge is :func:`rapc.pipeline.report.report`'s.

    Under torchrun every rank calls this; rank 0 returns the run directory, the others None.
    """
    check_start_from(cfg)
    with session(resolve_device(cfg.device)) as (ranks, device):
        ranks.from_main(lambda: RunDir(out).start(cfg))
        return _pipeline_on(ranks, device, cfg, out, reporter, latency)


def resume_training(out: str | Path, reporter: Reporter | None = None, latency: LatencyCost | None = None) -> Path | None:
    """Continue the interrupted training of the run in ``out`` from its last checkpoints, with its own config.

    Finished stages are loaded, not redone; the models equal those of an uninterrupted run
    (exactly on CPU). A trained run is left as it is. Under torchrun every rank calls this,
    whatever number of processes started the run: rank 0 decides and returns the run directory,
    the others follow and return None.
    """
    cfg = open_run(out).config()
    with session(resolve_device(cfg.device)) as (ranks, device):
        if ranks.from_main(lambda: _reopen(out)):
            return Path(out) if ranks.is_main else None
        return _pipeline_on(ranks, device, cfg, out, reporter, latency)


def _reopen(out: str | Path) -> bool:
    """On rank 0: whether the run is trained; an untrained one is first rewound to its last checkpoint."""
    run = RunDir(out)
    trained = run.trained() is not None or run.summary() is not None
    if not trained:
        run.rewind(STAGES)
    return trained


def _pipeline_on(ranks: Ranks, device: torch.device, cfg: Config, out: str | Path, reporter: Reporter | None,
                 latency: LatencyCost | None) -> Path | None:
    """The pipeline on this rank: rank 0 writes the run directory and reports, the others only read it."""
    run = RunDir(out) if ranks.is_main else ReadOnlyRunDir(out)
    return _pipeline(cfg, run, reporter if reporter is not None and ranks.is_main else SilentReporter(), ranks, device, latency)


def _pipeline(cfg: Config, run: RunDir, reporter: Reporter, ranks: Ranks, device: torch.device,
              latency: LatencyCost | None) -> Path | None:
    parts = RunParts.start(cfg, device)
    model, splits, architecture = parts.fresh_model(), parts.splits, parts.architecture
    if ranks.enabled:  # DDP starts every rank from rank 0's weights; attacks' random starts differ per rank
        torch.manual_seed(cfg.seed + ranks.rank)
    example = parts.data(ranks).example
    _check_input(model, example, cfg)
    trainer = parts.trainer(model, run, reporter, ranks)

    pretrained_saved = (run.pretrained / ARCHITECTURE).is_file()
    if pretrained_saved:  # resuming after pretraining: the saved model is reused
        load_weights(model, run.pretrained / WEIGHTS)
    elif cfg.stages.start_from:
        load_start(model, cfg.stages)
    trainer.stage("pretrain", cfg.stages.pretrain)
    if not pretrained_saved:  # else the start passed its check before this run was interrupted
        check_start(model, splits, cfg, run, reporter, ranks)
    pretrained = copy.deepcopy(model).eval()
    if not pretrained_saved and ranks.is_main:
        save_model(pretrained, architecture, run.pretrained)

    pruning, _ = budgeted(cfg, model, splits, example, run, reporter, ranks, latency)
    projector = Projector(model, example, pruning)
    for note in projector.notes:
        reporter.log(f"note: {note}")
    params = dict(model.named_parameters())
    admm = AdmmSchedule.start(params, projector, cfg.admm, check=_same_on_every_rank(ranks) if ranks.enabled else None)
    distill = distillation(pretrained, cfg.distill)  # the frozen dense model teaches the pruned one
    trainer.stage(
        "admm", cfg.stages.admm, Hooks(penalty=admm.penalty, after_step=admm.after_step, loss=distill),
        after_epoch=admm.after_epoch, extra=admm, select_best=False,
    )

    masks = hard_prune(model, projector)
    if not run.has_checkpoint("retrain"):  # else retraining had begun and this was logged before it
        hard = trainer.validate()
        run.log({"stage": "hard_prune", **hard, "sparsity": sparsity(model)})
        reporter.log(f"hard prune: val clean {hard['val_clean']:.3f} {hard['val_attack']} {hard['val_robust']:.3f}  sparsity {sparsity(model):.3f}")
        if warning := admm_warning(run.records()):
            reporter.log(f"warning: {warning}")
    trainer.stage("retrain", cfg.stages.retrain, replace(masks.hooks(), loss=distill), extra=masks)
    ranks.assert_same(masks.masks, "the retraining masks")
    baseline = _dense_baseline(trainer, pretrained, architecture, cfg)
    if not ranks.is_main:  # rank 0 shrinks and writes the models
        return None

    model.eval().to(memory_format=torch.contiguous_format)  # after channels_last training: the shrink and files use NCHW
    result = shrink(model, example, cfg.shrink)
    save_model(result.model, replace(architecture, pruning_history=result.history), run.compressed)
    reporter.log(f"shrink: removed {sum(result.removed.values())} channels, max abs diff {result.max_abs_diff:.2e}")

    notes = projector.notes + result.kept_zero
    run.write_trained(Trained(
        compare_layers(layer_stats(model, example), layer_stats(result.model, example)),
        {"removed": result.removed, "max_abs_diff": result.max_abs_diff, "kept_zero": result.kept_zero}, notes, baseline,
    ).to_json())
    return run.root


def _dense_baseline(trainer: Trainer, pretrained: nn.Module, architecture: Architecture, cfg: Config) -> str:
    """The dense model the compressed one is compared with, saved as the run's ``dense/``; returns what it is.

    Pruning trains for the ADMM and retraining stages after pretraining, often with a decaying
    learning rate; the pretrained model has had neither, so beside it compression would seem to
    buy robustness that the extra training bought. The control trains a copy of the pretrained
    model through the same two stages' epochs, optimizers and schedules, unpruned.
    """
    stages = cfg.stages
    if not stages.trains_dense_control:
        description = given_model(stages) if stages.weights_file else (
            f"the pretrained model ({stages.pretrain.epochs} epochs; not budget-matched: the compressed model "
            f"trained {stages.admm.epochs + stages.retrain.epochs} more)")
        control = pretrained
    else:
        description = (f"a budget-matched control: the pretrained model trained unpruned for the ADMM and retraining "
                       f"stages' {stages.admm.epochs} + {stages.retrain.epochs} epochs, optimizers and schedules")
        control = copy.deepcopy(pretrained).train()
        # It continues from pretraining's end, with the perturbations carried as pretraining left them.
        control_trainer = replace(trainer, model=control, train_model=training_module(control, cfg, trainer.device, trainer.ranks),
                                  store=trainer.carried_after("pretrain"))
        control_trainer.budget_matched("dense-")
        control.eval().to(memory_format=torch.contiguous_format)
    if trainer.ranks.is_main and not (trainer.run.dense / ARCHITECTURE).is_file():
        save_model(control, architecture, trainer.run.dense)
    return description


def _check_input(model: nn.Module, example: torch.Tensor, cfg: Config) -> None:
    try:
        with torch.no_grad():
            model.eval()(example[:2])
    except RuntimeError as exc:
        raise RapcError(
            f"model {cfg.model.name} does not accept {cfg.data.name} images of shape {list(example.shape[1:])} ({str(exc).splitlines()[0]})"
        ) from None
    finally:
        model.train()


def _same_on_every_rank(ranks: Ranks) -> Callable[[AdmmState], None]:
    """ADMM's Z and U come from the DDP-synchronised weights, so every rank must hold the same; checked at each update."""
    def check(state: AdmmState) -> None:
        ranks.assert_same({**{f"z.{n}": z for n, z in state.z.items()}, **{f"u.{n}": u for n, u in state.u.items()}}, "ADMM's Z and U")
    return check
