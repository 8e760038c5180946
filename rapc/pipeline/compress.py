"""``rapc compress``: dense adversarial training -> adversarial ADMM -> hard prune ->
masked adversarial retraining -> physical shrink, written to one run directory.
"""

from __future__ import annotations

import copy
import itertools
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from rapc.attacks import evaluate
from rapc.config import Config, StageConfig, TrainAttackConfig
from rapc.data import Splits, head, load_data, loader
from rapc.errors import RapcError
from rapc.modelio import ARCHITECTURE, Architecture, load_weights, read_architecture, resolve_model_dir, save_model, WEIGHTS
from rapc.pipeline.admm import AdmmSchedule, AdmmState
from rapc.pipeline.checkpoint import StageState, Stateful, check_finite
from rapc.pipeline.distributed import Ranks, agreed_stop, session, set_epoch
from rapc.pipeline.guard import OverfitGuard
from rapc.pipeline.interrupt import StopRequest
from rapc.pipeline.loop import EpochTotals, Hooks, NonFinite, SavePoints, make_optimizer, make_schedule, train_epoch
from rapc.pipeline.masks import MaskSet
from rapc.pipeline.measure import compare_layers, layer_stats, sparsity, summary
from rapc.pipeline.projection import Projector
from rapc.pipeline.shrink import shrink
from rapc.pipeline.speed import training_module
from rapc.progress import Reporter, SilentReporter
from rapc.rundir import ReadOnlyRunDir, RunDir, read_run_config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RapcError(f"device: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RapcError(f"device: {name} was asked for but no CUDA GPU is available; use device=cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def architecture_for(cfg: Config, splits: Splits) -> Architecture:
    info = splits.info
    args = {
        "num_classes": info.num_classes,
        "in_channels": info.channels,
        "image_size": info.image_size,
        "width": cfg.model.width,
        "mean": list(info.mean),
        "std": list(info.std),
        **cfg.model.kwargs,
    }
    return Architecture(cfg.model.name, args, [info.channels, info.image_size, info.image_size])


@dataclass(frozen=True)
class _Plan:
    """One stage as the trainer runs it: its name and settings, and what it adds to the loop."""

    name: str
    config: StageConfig
    hooks: Hooks
    after_epoch: Callable[[], dict[str, Any]] | None
    select_best: bool


@dataclass
class Trainer:
    """What every stage shares: the model, data, attack settings, run directory and progress.

    ``model`` is the user's module (names ``conv1.weight``): checkpoints, hooks and evaluation use
    it. ``train_model`` is the module training steps go through (DDP, compiled), sharing its weights.
    """

    cfg: Config
    model: nn.Module
    device: torch.device
    run: RunDir
    train: DataLoader
    val: DataLoader
    guard_batch: tuple[torch.Tensor, torch.Tensor]
    reporter: Reporter = field(default_factory=SilentReporter)
    ranks: Ranks = field(default_factory=Ranks)
    train_model: nn.Module | None = None  # None: ``model`` itself

    def validate(self) -> dict[str, float]:
        """Validation accuracies, computed on rank 0 and the same on every rank (they choose the best epoch)."""
        return self.ranks.from_main(lambda: evaluate(self.model, self.val, self.cfg.attack.eval, self.device))

    def stage(
        self,
        name: str,
        stage: StageConfig,
        hooks: Hooks = Hooks(),
        after_epoch: Callable[[], dict[str, Any]] | None = None,
        extra: Stateful | None = None,
        select_best: bool = True,
    ) -> None:
        """Train ``stage.epochs`` epochs; keep the epoch with the best validation robust accuracy if asked.

        A checkpoint of the stage in the run directory is continued from; a complete stage is
        only loaded, never trained again.
        """
        if stage.epochs == 0:
            return
        plan = _Plan(name, stage, hooks, after_epoch, select_best)
        state = self._stage_state(plan, extra)
        if state.complete:
            state.restore_rng(self.cfg.seed)
            return
        with StopRequest(interrupt_twice=not self.ranks.enabled) as stop:
            for epoch in range(state.epoch + 1, stage.epochs + 1):
                try:
                    stopped = self._epoch(plan, epoch, state, stop)
                except NonFinite as exc:
                    kept = (f"{self.run.checkpoint(name)} keeps the last good state" if self.run.has_checkpoint(name)
                            else "nothing of it was checkpointed")
                    raise RapcError(f"{name} epoch {epoch}: {exc}; stopped, {kept}; try a lower stages.{name}.optimizer.lr in a new run") from None
                if self.ranks.any(stop(), self.device):
                    raise KeyboardInterrupt
                if stopped:
                    break
        if select_best and state.best_model is not None:
            self.model.load_state_dict(state.best_model)
        state.complete = True
        self._save(name, state)

    def _stage_state(self, plan: _Plan, extra: Stateful | None) -> StageState:
        """A fresh stage, or the one its checkpoint in the run directory saved."""
        attack_cfg = self.cfg.attack.train
        optimizer = make_optimizer(self.model.parameters(), plan.config.optimizer)
        state = StageState(
            self.model, optimizer, make_schedule(optimizer, plan.config.schedule, len(self.train), plan.config.epochs),
            scaler=torch.amp.GradScaler(self.device.type) if self.cfg.precision == "fp16" else None,
            guard=(
                OverfitGuard(self.guard_batch, self.cfg.attack.eval, attack_cfg.guard.drop)
                if attack_cfg.method == "fgsm" and attack_cfg.guard.enabled
                else None
            ),
            extra=extra, shuffle=self.train.generator.get_state(), ranks=self.ranks,
        )
        if self.run.has_checkpoint(plan.name):
            try:
                state.load_state_dict(self.run.load_checkpoint(plan.name))
            except (KeyError, TypeError, ValueError, RuntimeError):  # keys missing or of another shape
                raise self.run.foreign_checkpoint(plan.name) from None
            self.reporter.log(f"{plan.name}: {state.describe()}")
        return state

    def _epoch(self, plan: _Plan, epoch: int, state: StageState, stop: StopRequest) -> bool:
        """Train, validate and checkpoint one epoch; True when the overfitting guard stops the stage."""
        name, attack_cfg = plan.name, self.cfg.attack.train
        attack = _epoch_attack(attack_cfg, plan.config, epoch)
        if state.totals is None:  # a fresh epoch; a resumed one keeps what its checkpoint saved
            state.record = {"stage": name, "epoch": epoch, "train_eps": attack.eps if attack else 0.0, "lr": state.optimizer.param_groups[0]["lr"]}
            state.epoch_start = copy.deepcopy(self.model.state_dict()) if state.guard and attack else None
        batches = self._epoch_batches(state, name, epoch)
        self.reporter.begin(f"{name} {epoch}/{plan.config.epochs}", len(self.train) - (state.totals.steps if state.totals else 0))
        start = time.perf_counter()

        def save_inside(totals: EpochTotals) -> None:
            state.totals = totals
            self._save(name, state)

        record = state.record | train_epoch(
            self.train_model or self.model, batches, state.optimizer, state.schedule, attack=attack, device=self.device,
            precision=self.cfg.precision, scaler=state.scaler, hooks=plan.hooks, reporter=self.reporter, totals=state.totals,
            save_points=SavePoints(save_inside, self.cfg.stages.checkpoint_every_steps, agreed_stop(self.ranks, stop, self.device)),
            reduce=(lambda totals: totals.summed(self.ranks.all_sum)) if self.ranks.enabled else None,
        )
        record["train_seconds"] = time.perf_counter() - start
        if plan.after_epoch is not None:
            record |= plan.after_epoch()

        def judge() -> dict[str, Any]:  # on rank 0 only: the guard's PGD draws random starts
            val = evaluate(self.model, self.val, self.cfg.attack.eval, self.device)
            figures = {"val_clean": val["clean"], "val_robust": val["robust"], "sparsity": sparsity(self.model)}
            if state.guard is not None and state.epoch_start is not None:
                figures["guard_pgd"], figures["catastrophic_overfitting"] = state.guard.check(self.model)
            return figures

        record |= self.ranks.from_main(judge)
        collapsed = record.get("catastrophic_overfitting", False)
        record["seconds"] = time.perf_counter() - start
        self.run.log(record)
        self.reporter.end(_epoch_line(record, plan.config.epochs))
        if collapsed:
            self.reporter.log(f"[yellow]warning[/]: {name} epoch {epoch}: PGD accuracy on a training batch collapsed (catastrophic overfitting of FGSM training)")
            if attack_cfg.guard.action == "stop":
                self.model.load_state_dict(state.epoch_start)
                self.reporter.log(f"{name}: stopped; kept the weights of epoch {epoch - 1}")
                return True
        score = record["val_robust"] if attack_cfg.method != "none" else record["val_clean"]
        if plan.select_best and score >= state.best_score:
            state.best_score, state.best_model = score, copy.deepcopy(self.model.state_dict())
        state.finish_epoch(epoch, self.train.generator.get_state())
        self._save(name, state)
        return False

    def _epoch_batches(self, state: StageState, name: str, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of the epoch in progress, from the shuffle generator's state at its start.

        After a resume inside the epoch the batches already trained on are drawn again and dropped
        (loading them is cheap next to adversarial steps); only then are the global generators
        restored, because drawing them may have run random augmentation. Each rank of a torchrun
        skips as many of its own batches (DistributedSampler's order comes from the seed and the
        epoch); resumed with another number of processes, that is the same count of other batches.
        """
        self.train.generator.set_state(state.shuffle)
        set_epoch(self.train, name, epoch)
        if state.totals is None:
            state.restore_rng(self.cfg.seed)
            return self.train
        batches = iter(self.train)
        for _ in itertools.islice(batches, state.totals.steps):
            pass
        state.restore_rng(self.cfg.seed)
        return batches

    def _save(self, name: str, state: StageState) -> None:
        """Checkpoint the stage; a NaN is found first and never written over the last good checkpoint.

        Every rank of a torchrun takes part (the checkpoint gathers from all) and decides alike, on
        the loss summed over ranks and on the weights DDP keeps equal.
        """
        checkpoint = state.state_dict()
        if checkpoint["totals"] is not None:
            EpochTotals.from_state_dict(checkpoint["totals"], self.device).read()
        check_finite(self.model)
        self.run.save_checkpoint(name, checkpoint)


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    line = (f"{record['stage']:8s} {record['epoch']}/{epochs}  loss {record['loss']:.3f}  acc {record['train_acc']:.3f}  "
            f"val clean/PGD {record['val_clean']:.3f}/{record['val_robust']:.3f}")
    if "residuals" in record:
        line += f"  rho {record['rho']:.3g}  residual {max(record['residuals'].values()):.3f}"
    return line + f"  {record['seconds']:.0f}s"


def _epoch_attack(attack: TrainAttackConfig, stage: StageConfig, epoch: int) -> TrainAttackConfig | None:
    """The training attack of an epoch: none in clean epochs, eps (and step) scaled up during the ramp."""
    adversarial_epoch = epoch - stage.clean_epochs
    if adversarial_epoch < 1 or attack.method == "none":
        return None
    if adversarial_epoch > stage.eps_ramp_epochs:
        return attack
    scale = adversarial_epoch / (stage.eps_ramp_epochs + 1)
    return attack.model_copy(update={"eps": attack.eps * scale, "step": attack.step and attack.step * scale})


def _start_weights(model: nn.Module, path: str) -> None:
    directory = Path(path) / "dense" if (Path(path) / "dense").is_dir() else resolve_model_dir(path)
    if read_architecture(directory).pruning_history:
        raise RapcError(f"stages.start_from: {directory} holds a pruned model; start from a dense one")
    load_weights(model, directory / WEIGHTS)


def _report(model: nn.Module, test: DataLoader, cfg: Config, device: torch.device, example: torch.Tensor, weights: Path) -> dict[str, Any]:
    figures = summary(model, example)
    figures |= evaluate(model, test, cfg.attack.eval, device)
    figures["file_bytes"] = weights.stat().st_size
    return figures


@dataclass
class CompressResult:
    run: Path
    dense: dict[str, Any]
    compressed: dict[str, Any]
    layers: list[dict[str, Any]]
    notes: list[str]
    finished_before: bool = False  # a resumed run that had already finished: re-reported, not retrained


STAGES = ("pretrain", "admm", "retrain")


def compress(cfg: Config, out: str | Path, reporter: Reporter | None = None) -> CompressResult | None:
    """Run the whole pipeline in a new run directory ``out``; everything is written under it.

    Under torchrun every rank calls this; rank 0 writes the run and returns its result, the
    others return None.
    """
    with session(resolve_device(cfg.device)) as (ranks, device):
        ranks.from_main(lambda: RunDir(out).start(cfg))
        return _pipeline_on(ranks, device, cfg, out, reporter)


def resume(out: str | Path, reporter: Reporter | None = None) -> CompressResult | None:
    """Continue the interrupted run in ``out`` from its last checkpoints, with its own config.

    Finished stages are loaded, not redone; the result equals that of an uninterrupted run
    (exactly on CPU). A run that had already finished is only re-reported. Under torchrun every
    rank calls this, whatever number of processes started the run: rank 0 decides and returns
    the result, the others follow and return None.
    """
    cfg = read_run_config(out)
    with session(resolve_device(cfg.device)) as (ranks, device):
        summary = ranks.from_main(lambda: _reopen(out))
        if summary is None:
            return _pipeline_on(ranks, device, cfg, out, reporter)
        if not ranks.is_main:
            return None
        return CompressResult(Path(out), summary["dense"], summary["compressed"], summary["layers"], summary["notes"], finished_before=True)


def _reopen(out: str | Path) -> dict[str, Any] | None:
    """On rank 0: a finished run's summary, or None once an unfinished run is rewound to its last checkpoint."""
    run = RunDir(out)
    summary = run.summary()
    if summary is None:
        run.rewind(STAGES)
    return summary


def _pipeline_on(ranks: Ranks, device: torch.device, cfg: Config, out: str | Path, reporter: Reporter | None) -> CompressResult | None:
    """The pipeline on this rank: rank 0 writes the run directory and reports, the others only read it."""
    run = RunDir(out) if ranks.is_main else ReadOnlyRunDir(out)
    return _pipeline(cfg, run, reporter if reporter is not None and ranks.is_main else SilentReporter(), ranks, device)


@dataclass(frozen=True)
class RunData:
    """A run's splits, batched as every stage and evaluation of it uses them."""

    train: DataLoader  # under torchrun, this rank's share (DistributedSampler)
    val: DataLoader
    test: DataLoader
    guard_batch: tuple[torch.Tensor, torch.Tensor]  # the FGSM overfitting guard's fixed training batch
    example: torch.Tensor  # up to 64 validation images on the device: traces for pruning, the shrink and MAC counts

    @classmethod
    def make(cls, cfg: Config, splits: Splits, device: torch.device, ranks: Ranks = Ranks()) -> RunData:
        pin, workers = device.type == "cuda", cfg.data.workers
        train = ranks.train_loader(splits.train, cfg.data.batch_size, seed=cfg.seed, workers=workers, pin=pin)
        if train is None:
            train = loader(splits.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed, workers=workers, pin=pin)
        val = loader(head(splits.val, cfg.eval.n_val), cfg.data.eval_batch_size, shuffle=False, workers=workers, pin=pin)
        test = loader(head(splits.test, cfg.eval.n_test), cfg.data.eval_batch_size, shuffle=False, workers=workers, pin=pin)
        return cls(train, val, test, next(iter(loader(splits.train, 256, shuffle=False))), next(iter(val))[0][:64].to(device))


def hard_prune(model: nn.Module, projector: Projector) -> MaskSet:
    """Zero what the projection of the current weights drops, and return the masks that keep it zero:
    the hard prune after ADMM, or a one-shot magnitude prune of a trained model."""
    params = dict(model.named_parameters())
    masks = MaskSet(model, projector.masks({n: params[n] for n in projector.targets}, params))
    masks.apply()
    return masks


def _pipeline(cfg: Config, run: RunDir, reporter: Reporter, ranks: Ranks, device: torch.device) -> CompressResult | None:
    seed_everything(cfg.seed)
    splits = load_data(cfg.data, cfg.seed)
    architecture = architecture_for(cfg, splits)
    model = architecture.build(allow_import=cfg.model.allow_import).to(device)
    if ranks.enabled:  # DDP starts every rank from rank 0's weights; attacks' random starts differ per rank
        torch.manual_seed(cfg.seed + ranks.rank)
    data = RunData.make(cfg, splits, device, ranks)
    example = data.example
    _check_input(model, example, cfg)
    trainer = Trainer(cfg, model, device, run, data.train, data.val, data.guard_batch, reporter, ranks, training_module(model, cfg, device, ranks))

    dense_saved = (run.dense / ARCHITECTURE).is_file()
    if dense_saved:  # resuming after pretraining: the saved dense model is reused
        load_weights(model, run.dense / WEIGHTS)
    elif cfg.stages.start_from:
        _start_weights(model, cfg.stages.start_from)
    trainer.stage("pretrain", cfg.stages.pretrain)
    dense = copy.deepcopy(model).eval()
    if not dense_saved and ranks.is_main:
        save_model(dense, architecture, run.dense)

    projector = Projector(model, example, cfg.pruning)
    for note in projector.notes:
        reporter.log(f"note: {note}")
    params = dict(model.named_parameters())
    admm = AdmmSchedule.start(params, projector, cfg.admm, check=_same_on_every_rank(ranks) if ranks.enabled else None)
    trainer.stage(
        "admm", cfg.stages.admm, Hooks(penalty=admm.penalty, after_step=admm.after_step),
        after_epoch=admm.after_epoch, extra=admm, select_best=False,
    )

    masks = hard_prune(model, projector)
    if not run.has_checkpoint("retrain"):  # else retraining had begun and this was logged before it
        hard = trainer.validate()
        run.log({"stage": "hard_prune", "val_clean": hard["clean"], "val_robust": hard["robust"], "sparsity": sparsity(model)})
        reporter.log(f"hard prune: val clean/PGD {hard['clean']:.3f}/{hard['robust']:.3f}  sparsity {sparsity(model):.3f}")
    trainer.stage("retrain", cfg.stages.retrain, Hooks(before_step=masks.mask_grads, after_step=masks.apply), extra=masks)
    ranks.assert_same(masks.masks, "the retraining masks")
    if not ranks.is_main:  # rank 0 shrinks, evaluates on the test split and writes the result
        return None

    model.eval().to(memory_format=torch.contiguous_format)  # after channels_last training: the shrink and files use NCHW
    result = shrink(model, example, cfg.shrink)
    save_model(result.model, replace(architecture, pruning_history=result.history), run.model)
    reporter.log(f"shrink: removed {sum(result.removed.values())} channels, max abs diff {result.max_abs_diff:.2e}")

    reporter.begin("evaluating on the test split", 2)
    dense_report = _report(dense, data.test, cfg, device, example, run.dense / WEIGHTS)
    reporter.advance()
    compressed_report = _report(result.model, data.test, cfg, device, example, run.model / WEIGHTS)
    reporter.end("evaluated dense and compressed models on the test split")
    layers = compare_layers(layer_stats(model, example), layer_stats(result.model, example))
    notes = projector.notes + result.kept_zero
    run.write_json("summary.json", {
        "dense": dense_report, "compressed": compressed_report, "layers": layers,
        "shrink": {"removed": result.removed, "max_abs_diff": result.max_abs_diff, "kept_zero": result.kept_zero},
        "notes": notes, "attack": cfg.attack.eval.model_dump(),
    })
    return CompressResult(run.root, dense_report, compressed_report, layers, notes)


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
