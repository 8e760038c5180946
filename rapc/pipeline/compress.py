"""``rapc compress``: dense adversarial training -> adversarial ADMM -> hard prune ->
masked adversarial retraining -> physical shrink, written to one run directory.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from rapc import judge, judgement
from rapc.config import Config
from rapc.data import load_data
from rapc.device import resolve_device, seed_everything
from rapc.errors import RapcError
from rapc.measure import compare_layers, layer_stats, sparsity, summary
from rapc.modelio import ARCHITECTURE, WEIGHTS, Architecture, load_weights, save_model
from rapc.pipeline.admm import AdmmSchedule, AdmmState, unconverged
from rapc.pipeline.budget import LatencyCost, budget_report, budgeted
from rapc.pipeline.distill import distillation
from rapc.pipeline.distributed import Ranks, session
from rapc.pipeline.loop import Hooks
from rapc.pipeline.masks import hard_prune
from rapc.pipeline.projection import Projector, check_schemes
from rapc.pipeline.shrink import shrink
from rapc.pipeline.speed import training_module
from rapc.pipeline.start import check_start, check_start_from, given_model, load_start
from rapc.pipeline.trainer import RunData, Trainer
from rapc.progress import Reporter, SilentReporter
from rapc.rundir import ReadOnlyRunDir, RunDir, open_run


def _report(model: nn.Module, name: str, run: RunDir, test: DataLoader, cfg: Config, example: torch.Tensor,
            reporter: Reporter) -> dict[str, Any]:
    """Size and the judge's final figures on the test split: clean, FGSM, PGD and the ensemble,
    each with its label, n and standard error; ``robust`` is the strongest (the ensemble).

    The verdict per image, with its adversarial images, is saved beside the run's models
    (``RunPaths.judgement``), so that bench replays it rather than attacking again. The
    protocol records the loader's batch size: PGD draws its random starts per batch."""
    protocol = judge.final_protocol(cfg.attack.eval, n_ensemble=cfg.eval.n_ensemble, seed=cfg.seed, batch=test.batch_size)
    weights = run.models()[name] / WEIGHTS
    images, labels = (torch.cat(parts) for parts in zip(*test))
    saved = judgement.load(run.judgement(name), images)
    if saved is not None and saved.covers(protocol, judgement.file_digest(weights), images, labels) and saved.is_all_of(protocol, len(labels)):
        # A run interrupted during the final judge (two thirds of the default run) keeps what it had judged.
        reporter.log(f"{name}: reused the judgement this run saved before it was interrupted ({saved.describe()})")
        verdict = saved.verdict
    else:
        verdict = judge.judge_loader(model, test, protocol, reporter=reporter, title=name, keep_images=True)
        judgement.save(run.judgement(name), verdict, weights, labels, next(model.parameters()).device)
    return summary(model, example) | {
        "file_bytes": weights.stat().st_size, "clean": verdict.clean.accuracy, "pgd": verdict["pgd"].accuracy,
        "robust": verdict.robust.accuracy, "judge": verdict.to_dict(),
    }


@dataclass
class CompressResult:
    run: Path
    dense: dict[str, Any]
    compressed: dict[str, Any]
    layers: list[dict[str, Any]]
    notes: list[str]
    baseline: str  # what the dense figures come from
    warnings: list[str]  # an unconverged ADMM's, then the judge's gradient-masking warnings
    budget: dict[str, Any] | None = None  # with pruning.target: target vs achieved (budget_report)
    seconds: dict[str, float] | None = None  # where the time went (_seconds); None in a summary from before it
    finished_before: bool = False  # a resumed run that had already finished: re-reported, not retrained


STAGES = ("pretrain", "admm", "retrain", "dense-admm", "dense-retrain")  # in the order they run


def compress(cfg: Config, out: str | Path, reporter: Reporter | None = None, latency: LatencyCost | None = None) -> CompressResult | None:
    """Run the whole pipeline in a new run directory ``out``; everything is written under it.

    Under torchrun every rank calls this; rank 0 writes the run and returns its result, the
    others return None. ``latency`` measures a latency target (rapc.bench.latency.latency_cost).
    """
    check_schemes(cfg.pruning)  # a misspelt scheme fails now, not after pretraining
    check_start_from(cfg)
    with session(resolve_device(cfg.device)) as (ranks, device):
        ranks.from_main(lambda: RunDir(out).start(cfg))
        return _pipeline_on(ranks, device, cfg, out, reporter, latency)


def resume(out: str | Path, reporter: Reporter | None = None, latency: LatencyCost | None = None) -> CompressResult | None:
    """Continue the interrupted run in ``out`` from its last checkpoints, with its own config.

    Finished stages are loaded, not redone; the result equals that of an uninterrupted run
    (exactly on CPU). A run that had already finished is only re-reported. Under torchrun every
    rank calls this, whatever number of processes started the run: rank 0 decides and returns
    the result, the others follow and return None.
    """
    cfg = open_run(out).config()
    with session(resolve_device(cfg.device)) as (ranks, device):
        summary = ranks.from_main(lambda: _reopen(out))
        if summary is None:
            return _pipeline_on(ranks, device, cfg, out, reporter, latency)
        if not ranks.is_main:
            return None
        return CompressResult(Path(out), summary["dense"], summary["compressed"], summary["layers"], summary["notes"],
                              summary["baseline"], summary["warnings"], summary.get("budget"), summary.get("seconds"),
                              finished_before=True)


def _reopen(out: str | Path) -> dict[str, Any] | None:
    """On rank 0: a finished run's summary, or None once an unfinished run is rewound to its last checkpoint."""
    run = RunDir(out)
    summary = run.summary()
    if summary is None:
        run.rewind(STAGES)
    return summary


def _pipeline_on(ranks: Ranks, device: torch.device, cfg: Config, out: str | Path, reporter: Reporter | None,
                 latency: LatencyCost | None) -> CompressResult | None:
    """The pipeline on this rank: rank 0 writes the run directory and reports, the others only read it."""
    run = RunDir(out) if ranks.is_main else ReadOnlyRunDir(out)
    return _pipeline(cfg, run, reporter if reporter is not None and ranks.is_main else SilentReporter(), ranks, device, latency)


def _pipeline(cfg: Config, run: RunDir, reporter: Reporter, ranks: Ranks, device: torch.device,
              latency: LatencyCost | None) -> CompressResult | None:
    seed_everything(cfg.seed)
    splits = load_data(cfg.data, cfg.seed)
    architecture = Architecture.for_data(cfg.model, splits.info)
    model = architecture.build(allow_import=cfg.model.allow_import).to(device)
    if ranks.enabled:  # DDP starts every rank from rank 0's weights; attacks' random starts differ per rank
        torch.manual_seed(cfg.seed + ranks.rank)
    data = RunData.make(cfg, splits, device, ranks)
    example = data.example
    _check_input(model, example, cfg)
    trainer = Trainer(cfg, model, device, run, data.train, data.val, data.guard_batch, reporter, ranks, training_module(model, cfg, device, ranks))

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

    pruning, allocation = budgeted(cfg, model, splits, example, run, reporter, ranks, latency)
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
        if warning := _admm_warning(run.records()):
            reporter.log(f"warning: {warning}")
    trainer.stage("retrain", cfg.stages.retrain, replace(masks.hooks(), loss=distill), extra=masks)
    ranks.assert_same(masks.masks, "the retraining masks")
    dense, baseline = _dense_baseline(trainer, pretrained, architecture, cfg)
    if not ranks.is_main:  # rank 0 shrinks, evaluates on the test split and writes the result
        return None

    model.eval().to(memory_format=torch.contiguous_format)  # after channels_last training: the shrink and files use NCHW
    result = shrink(model, example, cfg.shrink)
    save_model(result.model, replace(architecture, pruning_history=result.history), run.compressed)
    reporter.log(f"shrink: removed {sum(result.removed.values())} channels, max abs diff {result.max_abs_diff:.2e}")

    judging = time.perf_counter()
    dense_report = _report(dense, "dense", run, data.test, cfg, example, reporter)
    compressed_report = _report(result.model, "compressed", run, data.test, cfg, example, reporter)
    records = run.records()
    seconds = _seconds(records, time.perf_counter() - judging)
    layers = compare_layers(layer_stats(model, example), layer_stats(result.model, example))
    notes = projector.notes + result.kept_zero
    warnings = [f"{name}: {w}" for name, r in (("dense", dense_report), ("compressed", compressed_report)) for w in r["judge"]["warnings"]]
    if warning := _admm_warning(records):
        warnings.insert(0, f"compressed: {warning}")
    budget = budget_report(allocation, dense_report, compressed_report) if allocation is not None else None
    run.write_summary({
        "dense": dense_report, "compressed": compressed_report, "layers": layers,
        "shrink": {"removed": result.removed, "max_abs_diff": result.max_abs_diff, "kept_zero": result.kept_zero},
        "notes": notes, "baseline": baseline, "warnings": warnings, "budget": budget, "seconds": seconds,
        "start_check": json.loads(run.start_check.read_text()) if run.start_check.is_file() else None,
    })
    return CompressResult(run.root, dense_report, compressed_report, layers, notes, baseline, warnings, budget, seconds)


def _admm_warning(records: list[dict[str, Any]]) -> str | None:
    """unconverged() on the run's log, so that a resumed run (its hard prune logged before) still says it."""
    admm = [r for r in records if r["stage"] == "admm" and "val_robust" in r]  # its last epoch is validated
    pruned = [r for r in records if r["stage"] == "hard_prune"]
    return unconverged(admm[-1], pruned[-1]) if admm and pruned else None


def _seconds(records: list[dict[str, Any]], judging: float) -> dict[str, float]:
    """Where the run's time went: each stage's epochs (training and selection) as metrics.jsonl
    logged them, so the epochs of an interrupted run count too (an epoch resumed from inside
    counts from its resume), the dense control's two stages as one, and the final judge of both
    models. Setup (data, the start check, an allocation) and the shrink are not counted."""
    stages: dict[str, float] = {}
    for record in records:
        if "epoch" in record and "seconds" in record:
            stage = "dense control" if record["stage"].startswith("dense-") else record["stage"]
            stages[stage] = stages.get(stage, 0.0) + record["seconds"]
    return stages | {"final judge": judging}


def _dense_baseline(trainer: Trainer, pretrained: nn.Module, architecture: Architecture, cfg: Config) -> tuple[nn.Module, str]:
    """The dense model the compressed one is compared with, saved as the run's ``dense/``, and what it is.

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
    return control, description


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
