"""The contenders of a study, each a registered training recipe over the same data and epoch budget.

Two dense models are trained once per study and shared by every cell (they do not depend on
the pruning scheme or ratio): ``dense-robust`` (the config's pretraining stage, adversarial)
and ``dense-natural`` (the same stage on clean inputs). The rows of a cell (ratio, scheme):

    rapc               the pipeline from dense-robust: adversarial ADMM -> hard prune ->
                       masked adversarial retraining -> shrink
    scratch            rapc's shrunk architecture (and zeros), freshly initialised, trained adversarially
    inherited          rapc's shrunk architecture (and zeros) with dense-robust's *initial* weights (the
                       channels rapc kept, sliced from the dense init: the lottery-ticket
                       "inherited init" of Ye et al.), trained adversarially
    finetune-standard  dense-natural, pruned once by magnitude, adversarially fine-tuned with
                       masks, shrunk (adversarial fine-tuning of a compressed standard model,
                       arXiv 2403.09441)
    oneshot-magnitude  dense-robust, pruned once by magnitude, adversarially fine-tuned with
                       masks, shrunk (no ADMM)

Same budget: every row trains pretrain + admm + retrain epochs of the config in total,
counting the shared dense model's epochs for the rows that start from one. Magnitude
pruning is rapc's projection onto the scheme at the same ratio (largest L2 norm per filter,
column or channel, summed over coupled layers as torch-pruning's group magnitude importance
does), so for filter and channel schemes the pruned rows have rapc's architecture exactly.

A row only trains; ``evaluation.py`` measures every row's final model the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from rapc.config import Config, StageConfig, validate
from rapc.data import Splits, load_data
from rapc.modelio import Architecture, load_model, read_architecture, save_model
from rapc.device import resolve_device, seed_everything
from rapc.pipeline.compress import compress, resume
from rapc.pipeline.distributed import Ranks
from rapc.pipeline.loop import Hooks
from rapc.pipeline.masks import MaskSet, hard_prune
from rapc.pipeline.projection import Projector
from rapc.pipeline.shrink import shrink
from rapc.pipeline.speed import training_module
from rapc.pipeline.trainer import RunData, Trainer
from rapc.progress import Reporter
from rapc.registry import Registry
from rapc.rundir import RunDir

MODEL = "model"  # every row's final model directory, inside the row's directory


@dataclass(frozen=True)
class Trained:
    """How a row was trained; its final model is saved in ``directory / MODEL``."""

    epochs: dict[str, int]  # per training phase, shared dense epochs included
    recipe: str  # one line for the report


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


def budget(cfg: Config) -> int:
    stages = cfg.stages
    return stages.pretrain.epochs + stages.admm.epochs + stages.retrain.epochs


def _train(cell: Cell, directory: Path, model: nn.Module, data: RunData, name: str, stage: StageConfig,
           masks: MaskSet | None = None) -> None:
    """One stage of ``model`` in ``directory``, checkpointed there (an interrupted row continues);
    with ``masks``, masked training that keeps their zeros."""
    cfg, device = cell.cfg, next(model.parameters()).device
    trainer = Trainer(cfg, model, device, RunDir(directory), data.train, data.val, data.guard_batch, cell.reporter,
                      train_model=training_module(model, cfg, device, Ranks()))
    trainer.stage(name, stage, masks.hooks() if masks is not None else Hooks(), extra=masks)
    model.eval().to(memory_format=torch.contiguous_format)  # after channels_last training: files and the shrink use NCHW


def _to_dense_init(cfg: Config) -> Splits:
    """Seed and draw as ``rapc compress`` does before it initialises the dense model; the next draws are that init."""
    seed_everything(cfg.seed)
    return load_data(cfg.data, cfg.seed)


def _dense(cell: Cell, directory: Path, cfg: Config, recipe: str) -> Trained:
    device = resolve_device(cfg.device)
    splits = _to_dense_init(cfg)
    architecture = Architecture.for_data(cfg.model, splits.info)
    model = architecture.build(allow_import=cfg.model.allow_import).to(device)
    _train(replace(cell, cfg=cfg), directory, model, RunData.make(cfg, splits, device), "pretrain", cfg.stages.pretrain)
    save_model(model, architecture, directory / MODEL)
    return Trained({"pretrain": cfg.stages.pretrain.epochs}, recipe)


@DENSE.register("dense-robust")
def robust_dense(cell: Cell, directory: Path) -> Trained:
    return _dense(cell, directory, cell.cfg, "the config's pretraining stage (adversarial)")


@DENSE.register("dense-natural")
def natural_dense(cell: Cell, directory: Path) -> Trained:
    data = cell.cfg.model_dump(mode="json")
    data["attack"]["train"]["method"] = "none"
    return _dense(cell, directory, validate(data, "the naturally trained dense model"), "the config's pretraining stage on clean inputs")


@ROWS.register("rapc", marker="o", summary="the pipeline")
def rapc_row(cell: Cell, directory: Path) -> Trained:
    """rapc's pipeline after pretraining: the pretraining stage is the shared robust dense model."""
    data = cell.cfg.model_dump(mode="json")
    data["stages"]["start_from"] = str(cell.model_of("dense-robust"))
    data["stages"]["pretrain"]["epochs"] = 0
    data["stages"]["dense_control"] = False  # the study trains its own dense rows
    cfg = validate(data, f"rapc row of {cell.ratio:g}x {cell.scheme}")
    if (directory / "config.yaml").is_file():  # started before: continued from its checkpoints, or only re-read
        resume(directory, cell.reporter)
    else:
        compress(cfg, directory, cell.reporter)
    stages = cell.cfg.stages
    return Trained({"pretrain (shared)": stages.pretrain.epochs, "admm": stages.admm.epochs, "retrain": stages.retrain.epochs},
                   "dense-robust -> adversarial ADMM -> hard prune -> masked adversarial retraining -> shrink")


def initial_shrunk(cfg: Config, shrunk: Architecture, device: torch.device, fresh: bool) -> nn.Module:
    """rapc's shrunk architecture, initialised with the dense init's weights of the channels rapc kept
    (torch-pruning replays rapc's removals on that init), or ``fresh`` for its own small shapes."""
    _to_dense_init(cfg)
    model = shrunk.build(allow_import=cfg.model.allow_import).to(device)
    if fresh:
        torch.manual_seed(cfg.seed + 1)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def _zero_pattern(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks of the weights that hold zeros: what the shrink could not remove (column,
    irregular and 2:4 zeros; none after filter pruning) stays zero in the rows trained on rapc's
    architecture, so they are as sparse as rapc's model."""
    return {name: p != 0 for name, p in model.named_parameters() if p.dim() > 1 and not p.all()}


def _from_init(cell: Cell, directory: Path, name: str, fresh: bool, recipe: str) -> Trained:
    """rapc's shrunk architecture and zeros, trained adversarially for the whole budget from an initialisation."""
    cfg = cell.cfg
    rapc = cell.model_of("rapc")
    shrunk, device = read_architecture(rapc), resolve_device(cfg.device)
    model = initial_shrunk(cfg, shrunk, device, fresh)
    masks = MaskSet(model, _zero_pattern(load_model(rapc, allow_import=cfg.model.allow_import)))
    masks.apply()
    epochs = budget(cfg)
    _train(cell, directory, model, RunData.make(cfg, load_data(cfg.data, cfg.seed), device), name,
           cfg.stages.pretrain.model_copy(update={"epochs": epochs}), masks)
    save_model(model, shrunk, directory / MODEL)
    return Trained({name: epochs}, recipe)


@ROWS.register("scratch", marker="s", summary="rapc's shrunk architecture, random init")
def scratch_row(cell: Cell, directory: Path) -> Trained:
    return _from_init(cell, directory, "scratch", fresh=True,
                      recipe="rapc's shrunk architecture, fresh random init, the pretraining stage's recipe for the whole budget")


@ROWS.register("inherited", marker="^", summary="rapc's shrunk architecture, the dense model's initial weights")
def inherited_row(cell: Cell, directory: Path) -> Trained:
    return _from_init(cell, directory, "inherited", fresh=False,
                      recipe="rapc's shrunk architecture, dense-robust's initial weights of the kept channels, the pretraining stage's recipe for the whole budget")


def _pruned_and_finetuned(cell: Cell, directory: Path, dense: str, stage: StageConfig) -> None:
    """``dense`` pruned once to the cell's scheme and ratio by magnitude, fine-tuned with masks, shrunk."""
    cfg = cell.cfg
    base = cell.model_of(dense)
    model = load_model(base, allow_import=cfg.model.allow_import).to(resolve_device(cfg.device)).train()
    data = RunData.make(cfg, load_data(cfg.data, cfg.seed), next(model.parameters()).device)
    masks = hard_prune(model, Projector(model, data.example, cfg.pruning))
    _train(cell, directory, model, data, "finetune", stage, masks)
    result = shrink(model, data.example, cfg.shrink)
    save_model(result.model, replace(read_architecture(base), pruning_history=result.history), directory / MODEL)


@ROWS.register("finetune-standard", marker="v", summary="natural dense, magnitude pruned, adversarially fine-tuned")
def finetune_standard_row(cell: Cell, directory: Path) -> Trained:
    stages = cell.cfg.stages
    epochs = stages.admm.epochs + stages.retrain.epochs
    # the natural model is not robust yet: fine-tuning ramps eps up as pretraining does
    stage = stages.retrain.model_copy(update={"epochs": epochs, "eps_ramp_epochs": stages.pretrain.eps_ramp_epochs})
    _pruned_and_finetuned(cell, directory, "dense-natural", stage)
    return Trained({"pretrain natural (shared)": stages.pretrain.epochs, "finetune": epochs},
                   "dense-natural -> one-shot magnitude pruning -> masked adversarial fine-tuning (retraining recipe, pretraining's eps ramp) -> shrink")


@ROWS.register("oneshot-magnitude", marker="D", summary="robust dense, magnitude pruned, adversarially fine-tuned")
def oneshot_row(cell: Cell, directory: Path) -> Trained:
    stages = cell.cfg.stages
    epochs = stages.admm.epochs + stages.retrain.epochs
    _pruned_and_finetuned(cell, directory, "dense-robust", stages.retrain.model_copy(update={"epochs": epochs}))
    return Trained({"pretrain (shared)": stages.pretrain.epochs, "finetune": epochs},
                   "dense-robust -> one-shot magnitude pruning -> masked adversarial fine-tuning (retraining recipe) -> shrink")


DEFAULT_ROWS = tuple(ROWS)  # a study runs every registered row, in registration order, unless --rows names some
