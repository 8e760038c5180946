"""The contenders of a study, each a registered training recipe over the same data and schedule.

Three dense models are trained once per study and shared by every cell (they do not depend on
the pruning scheme or ratio): ``dense-robust`` (the config's pretraining stage, adversarial),
``dense-natural`` (the same stage on clean inputs) and ``dense-matched`` (dense-robust trained
on, unpruned, through the ADMM and retraining stages' recipes: the budget-matched dense control
``rapc compress`` reports). The rows of a cell (ratio, scheme):

    rapc               the pipeline from dense-robust: adversarial ADMM -> hard prune ->
                       masked adversarial retraining -> shrink
    scratch            rapc's shrunk architecture (and zeros), freshly initialised, trained adversarially
    inherited          rapc's shrunk architecture (and zeros) with dense-robust's *initial* weights (the
                       channels rapc kept, sliced from the dense init: the lottery-ticket
                       "inherited init" of Ye et al.), trained adversarially
    finetune-standard  dense-natural, pruned once by magnitude, adversarially trained with
                       masks, shrunk (adversarial fine-tuning of a compressed standard model,
                       arXiv 2403.09441)
    oneshot-magnitude  dense-robust, pruned once by magnitude, adversarially fine-tuned with
                       masks, shrunk (no ADMM)

Equal schedules: every row trains through the recipes of the config's three stages once and
in order -- the pretraining stage's epochs (its clean and eps-ramp epochs too), optimizer and
schedule, then the ADMM stage's, then the retraining stage's -- so every row ends on the same
learning-rate schedule and trains the same epochs at full eps (and in the ramp). A shared
dense model is the pretraining of the rows that start from it. Rows differ only in where they
start (a random or inherited init, a dense model), where they prune (ADMM during the ADMM
stage's epochs, by magnitude before the first epoch at eps, or rapc's final architecture from
the start) and in ADMM's penalty, which only rapc trains with. finetune-standard starts from
dense-natural, which had no adversarial epoch: it runs all three recipes after pruning, and
the natural model's clean epochs come on top (the table's epochs column shows them). Each row
records its phases (``Phase``) in row.json's ``schedule``.

Magnitude pruning is rapc's projection onto the scheme at the same ratio (largest L2 norm per filter,
column or channel, summed over coupled layers as torch-pruning's group magnitude importance
does), so for filter and channel schemes the pruned rows have rapc's architecture exactly.

A row only trains; ``evaluation.py`` measures every row's final model the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rapc.config import Config, updated
from rapc.measure import macs_and_params
from rapc.modelio import Architecture, load_model, read_architecture, save_model
from rapc.pipeline.compress import resume_training, train
from rapc.pipeline.loop import Hooks
from rapc.pipeline.masks import MaskSet, hard_prune
from rapc.pipeline.projection import Projector
from rapc.pipeline.shrink import shrink
from rapc.pipeline.parts import RunParts
from rapc.pipeline.trainer import eps_epochs
from rapc.progress import Reporter
from rapc.registry import Registry
from rapc.rundir import RunDir, RunPaths

MODEL = "model"  # the final model's directory inside a row's directory (the rapc row's is its run's compressed/)


# The version of the rows' training recipes: a row directory claimed by another (study-config.yaml)
# is refused, not mixed into a study whose rows train otherwise. 2: equal schedules (every row runs
# the pretrain, ADMM and retraining stages' recipes), dense-matched.
RECIPES = 2
AFTER_PRETRAINING = ("admm", "retrain")  # the stages Trainer.budget_matched runs, in order


@dataclass(frozen=True)
class Phase:
    """One training phase of a row: which config stage's recipe it ran, and how that recipe trains."""

    name: str  # as the report's epochs column shows it
    stage: str  # the config stage whose epochs, clean and eps-ramp epochs, optimizer and schedule it ran
    epochs: int
    clean_epochs: int
    ramp_epochs: int  # eps growing towards its value
    full_eps_epochs: int
    optimizer: str
    lr: float
    schedule: str
    shared: bool = False  # trained once in a shared dense model, not by the row itself


def phases(cfg: Config, *stages: str, name: str | None = None, shared: bool = False) -> tuple[Phase, ...]:
    """The phases that run ``stages`` of ``cfg`` (on clean inputs throughout if its training attack is none)."""
    out = []
    for stage in stages:
        config = getattr(cfg.stages, stage)
        clean, ramp, full = eps_epochs(cfg.attack.train, config)
        out.append(Phase(name or stage, stage, config.epochs, clean, ramp, full, config.optimizer.name,
                         config.optimizer.lr, config.schedule.name, shared))
    return tuple(out)


def at_eps(schedule: list[dict]) -> list[dict]:
    """A recorded schedule's adversarial phases, without their names: what the rows of a study must share
    (the clean epochs before them and which phases were shared may differ)."""
    return [{k: v for k, v in phase.items() if k not in ("name", "shared")}
            for phase in schedule if phase["ramp_epochs"] + phase["full_eps_epochs"] > 0]


@dataclass(frozen=True)
class Trained:
    """How a row was trained; its final model is saved in ``final_model(directory)``."""

    phases: tuple[Phase, ...]  # in order, shared dense phases included
    recipe: str  # one line for the report

    @property
    def epochs(self) -> dict[str, int]:
        """Epochs per phase, as the report's epochs column shows them."""
        return {f"{p.name} (shared)" if p.shared else p.name: p.epochs for p in self.phases}

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "recipe": self.recipe, "schedule": [asdict(p) for p in self.phases],
                "full_eps_epochs": sum(p.full_eps_epochs for p in self.phases)}


@dataclass(frozen=True)
class Cell:
    """What a row is trained for: the cell's config (scheme and ratio set) and the study around it."""

    ratio: float  # compression factor; 1 for the shared dense models
    scheme: str
    cfg: Config
    reporter: Reporter
    model_of: Callable[[str], Path]  # a finished row's or shared dense model's saved model, trained first if need be


Builder = Callable[[Cell, Path], Trained]
DENSE: Registry[Builder] = Registry("shared dense model")
# A row registers with its plot marker and a summary for `rapc study --help`; the registration
# order is the order of the study's table, plot and help (DEFAULT_ROWS, at the end of this file).
ROWS: Registry[Builder] = Registry("study row")


def final_model(directory: Path) -> Path:
    """Where a row's final model is saved: the rapc row runs `rapc compress` in its directory (a run
    directory, with its config.yaml), whose compressed model is in ``compressed/``; the rows trained
    here save theirs in ``directory / MODEL``."""
    run = RunPaths(directory)
    return run.compressed if run.config_path.is_file() else directory / MODEL


def budget(cfg: Config) -> int:
    stages = cfg.stages
    return stages.pretrain.epochs + stages.admm.epochs + stages.retrain.epochs


def _train(cell: Cell, directory: Path, model: nn.Module, parts: RunParts, masks: MaskSet | None = None, *,
           pretrain: bool = True, after_pretraining: bool = True) -> None:
    """``model`` trained through the pretraining stage's recipe, then the ADMM and retraining stages' (without
    ADMM's penalty), or only one of the two parts; checkpointed in ``directory`` (an interrupted row continues).
    With ``masks``, masked training that keeps their zeros."""
    cfg = parts.cfg
    trainer = parts.trainer(model, RunDir(directory), cell.reporter)
    hooks = masks.hooks() if masks is not None else Hooks()
    if pretrain:
        trainer.stage("pretrain", cfg.stages.pretrain, hooks, extra=masks)
    if after_pretraining:
        trainer.budget_matched("", hooks, extra=masks)
    model.eval().to(memory_format=torch.contiguous_format)  # after channels_last training: files and the shrink use NCHW


def _dense(cell: Cell, directory: Path, cfg: Config, recipe: str) -> Trained:
    parts = RunParts.start(cfg)
    model = parts.fresh_model()
    _train(cell, directory, model, parts, after_pretraining=False)
    save_model(model, parts.architecture, directory / MODEL)
    return Trained(phases(cfg, "pretrain"), recipe)


def _natural(cfg: Config) -> Config:
    """``cfg`` with its training attack off: every epoch on clean inputs."""
    return updated(cfg, "the naturally trained dense model", attack={"train": {"method": "none"}})


@DENSE.register("dense-robust")
def robust_dense(cell: Cell, directory: Path) -> Trained:
    return _dense(cell, directory, cell.cfg, "the config's pretraining stage (adversarial)")


@DENSE.register("dense-natural")
def natural_dense(cell: Cell, directory: Path) -> Trained:
    return _dense(cell, directory, _natural(cell.cfg), "the config's pretraining stage on clean inputs")


@DENSE.register("dense-matched")
def matched_dense(cell: Cell, directory: Path) -> Trained:
    """dense-robust trained on, unpruned, as ``rapc compress`` trains its dense control (Trainer.budget_matched):
    the dense model with the compressed rows' schedule and full-eps epochs."""
    cfg = cell.cfg
    base = cell.model_of("dense-robust")
    parts = RunParts.start(cfg)
    model = parts.saved_model(base)
    _train(cell, directory, model, parts, pretrain=False)
    save_model(model, read_architecture(base), directory / MODEL)
    return Trained(phases(cfg, "pretrain", shared=True) + phases(cfg, *AFTER_PRETRAINING),
                   "dense-robust -> the ADMM and retraining stages' recipes, unpruned (rapc compress's budget-matched dense control)")


def _pipeline_row(cell: Cell, directory: Path, name: str, **changes: Any) -> None:
    """``rapc compress``'s training from dense-robust, after pretraining (the shared robust dense model is its
    pretraining stage), with the config changed by ``changes`` (config.updated); a row started before is continued
    or left as it is. The study judges the row's compressed model as it judges every row: compress's own judge is not run."""
    stages = {"start_from": str(cell.model_of("dense-robust")), "pretrain": {"epochs": 0},
              "dense_control": False,  # the study trains its own dense rows
              "check_start": False}  # dense-robust is measured as a row of its own
    if RunPaths(directory).config_path.is_file():
        resume_training(directory, cell.reporter)
    else:
        train(updated(cell.cfg, f"{name} row of {cell.ratio:g}x {cell.scheme}", stages=stages, **changes), directory, cell.reporter)


def _pipeline_trained(cell: Cell, recipe: str) -> Trained:
    return Trained(phases(cell.cfg, "pretrain", shared=True) + phases(cell.cfg, *AFTER_PRETRAINING), recipe)


DISTILL_WEIGHT = 1.0  # the rapc+distill row's weight when the config leaves distillation off


@ROWS.register("rapc", marker="o", summary="the pipeline")
def rapc_row(cell: Cell, directory: Path) -> Trained:
    _pipeline_row(cell, directory, "rapc", distill={"weight": 0.0})
    return _pipeline_trained(cell, "dense-robust -> adversarial ADMM -> hard prune -> masked adversarial retraining -> shrink")


@ROWS.register("rapc+distill", marker="P", summary="the pipeline, distilling from dense-robust during ADMM and retraining")
def rapc_distill_row(cell: Cell, directory: Path) -> Trained:
    weight = cell.cfg.distill.weight or DISTILL_WEIGHT

    _pipeline_row(cell, directory, "rapc+distill", distill={"weight": weight})
    return _pipeline_trained(cell, f"rapc's pipeline, its loss plus {weight:g} x T^2 x KL(dense-robust || student) at "
                                   f"T={cell.cfg.distill.temperature:g} on the student's adversarial examples (ADMM and retraining)")


@ROWS.register("rapc-sensitivity", marker="X", summary="the pipeline at the rapc row's MACs, per-layer ratios by robustness sensitivity")
def rapc_sensitivity_row(cell: Cell, directory: Path) -> Trained:
    """The rapc row's budget spent otherwise: the same fraction of the dense MACs, as pruning.target,
    allocated over layers by their adversarial-loss sensitivity instead of one ratio per layer."""
    fraction = _macs(cell.model_of("rapc"), cell.cfg) / _macs(cell.model_of("dense-robust"), cell.cfg)

    _pipeline_row(cell, directory, "rapc-sensitivity", distill={"weight": 0.0},
                  pruning={"target": {"macs": fraction}, "allocation": "sensitivity"})
    return _pipeline_trained(cell, f"rapc's pipeline to {fraction:.3f} of the dense MACs (the rapc row's), per-layer ratios "
                                   f"allocated by adversarial-loss sensitivity")


def _macs(model_dir: Path, cfg: Config) -> int:
    """Multiply-accumulates per image of the saved model in ``model_dir``."""
    example = torch.zeros(1, *read_architecture(model_dir).input_shape)
    return macs_and_params(load_model(model_dir, allow_import=cfg.model.allow_import), example)[0]


def initial_shrunk(cfg: Config, shrunk: Architecture, fresh: bool, device: torch.device | None = None) -> tuple[RunParts, nn.Module]:
    """rapc's shrunk architecture, initialised with the dense init's weights of the channels rapc kept
    (torch-pruning replays rapc's removals on that init), or ``fresh`` for its own small shapes; and the run's parts."""
    parts = RunParts.start(cfg, device)
    model = parts.fresh_model(shrunk)
    if fresh:
        torch.manual_seed(cfg.seed + 1)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return parts, model


def _zero_pattern(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks of the weights that hold zeros: what the shrink could not remove (column,
    irregular and 2:4 zeros; none after filter pruning) stays zero in the rows trained on rapc's
    architecture, so they are as sparse as rapc's model."""
    return {name: p != 0 for name, p in model.named_parameters() if p.dim() > 1 and not p.all()}


def _from_init(cell: Cell, directory: Path, fresh: bool, recipe: str) -> Trained:
    """rapc's shrunk architecture and zeros, trained adversarially through all three stages' recipes from an initialisation."""
    cfg = cell.cfg
    rapc = cell.model_of("rapc")
    shrunk = read_architecture(rapc)
    parts, model = initial_shrunk(cfg, shrunk, fresh)
    masks = MaskSet(model, _zero_pattern(load_model(rapc, allow_import=cfg.model.allow_import)))
    masks.apply()
    _train(cell, directory, model, parts, masks)
    save_model(model, shrunk, directory / MODEL)
    return Trained(phases(cfg, "pretrain", *AFTER_PRETRAINING), recipe)


@ROWS.register("scratch", marker="s", summary="rapc's shrunk architecture, random init")
def scratch_row(cell: Cell, directory: Path) -> Trained:
    return _from_init(cell, directory, fresh=True,
                      recipe="rapc's shrunk architecture, fresh random init, the pretraining, ADMM and retraining stages' recipes (no ADMM penalty)")


@ROWS.register("inherited", marker="^", summary="rapc's shrunk architecture, the dense model's initial weights")
def inherited_row(cell: Cell, directory: Path) -> Trained:
    return _from_init(cell, directory, fresh=False,
                      recipe="rapc's shrunk architecture, dense-robust's initial weights of the kept channels, the pretraining, "
                             "ADMM and retraining stages' recipes (no ADMM penalty)")


def _pruned_and_finetuned(cell: Cell, directory: Path, dense: str, pretrain: bool) -> None:
    """``dense`` pruned once to the cell's scheme and ratio by magnitude, trained with masks through the
    stages' recipes after pretraining (and the pretraining stage's first if ``pretrain``), shrunk."""
    cfg = cell.cfg
    base = cell.model_of(dense)
    parts = RunParts.start(cfg)
    model = parts.saved_model(base)
    example = parts.data().example
    masks = hard_prune(model, Projector(model, example, cfg.pruning))
    _train(cell, directory, model, parts, masks, pretrain=pretrain)
    result = shrink(model, example, cfg.shrink)
    save_model(result.model, replace(read_architecture(base), pruning_history=result.history), directory / MODEL)


@ROWS.register("finetune-standard", marker="v", summary="natural dense, magnitude pruned, adversarially fine-tuned")
def finetune_standard_row(cell: Cell, directory: Path) -> Trained:
    # The natural model has had no adversarial epoch: after pruning it runs the pretraining stage's recipe
    # too (its clean epochs and eps ramp), so that it trains at eps exactly as the other rows do.
    _pruned_and_finetuned(cell, directory, "dense-natural", pretrain=True)
    return Trained(phases(_natural(cell.cfg), "pretrain", name="pretrain natural", shared=True)
                   + phases(cell.cfg, "pretrain", *AFTER_PRETRAINING),
                   "dense-natural -> one-shot magnitude pruning -> masked adversarial training through the pretraining, ADMM "
                   "and retraining stages' recipes (no ADMM penalty) -> shrink")


@ROWS.register("oneshot-magnitude", marker="D", summary="robust dense, magnitude pruned, adversarially fine-tuned")
def oneshot_row(cell: Cell, directory: Path) -> Trained:
    _pruned_and_finetuned(cell, directory, "dense-robust", pretrain=False)
    return Trained(phases(cell.cfg, "pretrain", shared=True) + phases(cell.cfg, *AFTER_PRETRAINING),
                   "dense-robust -> one-shot magnitude pruning -> masked adversarial fine-tuning through the ADMM and "
                   "retraining stages' recipes (no ADMM penalty) -> shrink")


DEFAULT_ROWS = tuple(ROWS)  # a study runs every registered row, in registration order, unless --rows names some
