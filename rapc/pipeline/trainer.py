"""The one trainer every stage runs through: pretraining, ADMM and masked retraining differ
only by the hooks they give it. It owns what a stage needs beyond the loop itself: the epoch's
attack (eps ramp), validation and best-epoch selection, checkpoints inside and at the end of
epochs, resuming them, and stopping every rank of a torchrun at the same step.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from rapc import judge
from rapc.config import AttackConfig, Config, StageConfig, TrainAttackConfig
from rapc.data import Splits, head, loader
from rapc.errors import RapcError
from rapc.measure import sparsity
from rapc.pipeline.adversary import Indexed, PerturbationStore
from rapc.pipeline.checkpoint import StageState, Stateful, check_finite
from rapc.pipeline.distributed import Ranks, agreed_stop, set_epoch
from rapc.pipeline.guard import OverfitGuard
from rapc.pipeline.interrupt import StopRequest
from rapc.pipeline.loop import EpochTotals, Hooks, NonFinite, SavePoints, Step, make_optimizer, make_schedule, train_epoch
from rapc.progress import Reporter, SilentReporter
from rapc.rundir import RunDir


@dataclass(frozen=True)
class RunData:
    """A run's splits, batched as every stage and evaluation of it uses them."""

    train: DataLoader  # (image, label, dataset index); under torchrun, this rank's share
    val: DataLoader
    guard_batch: tuple[torch.Tensor, torch.Tensor]  # the FGSM overfitting guard's fixed training batch
    example: torch.Tensor  # up to 64 validation images on the device: traces for pruning, the shrink and MAC counts

    @classmethod
    def make(cls, cfg: Config, splits: Splits, device: torch.device, ranks: Ranks = Ranks()) -> RunData:
        pin, workers, carry = device.type == "cuda", cfg.data.workers, cfg.attack.train.carry
        if carry and splits.augmented:
            raise RapcError(f"attack.train.carry keeps each training image's perturbation in the image's own frame, and "
                            f"{cfg.data.name}'s random crops or flips move the image under it; turn augmentation off "
                            f"(imagefolder: data.hflip=false) or carry off")
        indexed = Indexed(splits.train)
        train = ranks.train_loader(indexed, cfg.data.batch_size, seed=cfg.seed, workers=workers, pin=pin, fixed_shards=carry)
        if train is None:
            train = loader(indexed, cfg.data.batch_size, shuffle=True, seed=cfg.seed, workers=workers, pin=pin)
        val = loader(head(splits.val, cfg.eval.n_val), cfg.data.eval_batch_size, shuffle=False, workers=workers, pin=pin)
        guard_batch = next(iter(loader(splits.train, cfg.attack.train.guard.images, shuffle=False)))
        return cls(train, val, guard_batch, next(iter(val))[0][:64].to(device))


def test_loader(cfg: Config, splits: Splits, device: torch.device) -> DataLoader:
    """The judge's images: the test split's first eval.n_test, unshuffled, in eval batches."""
    return loader(head(splits.test, cfg.eval.n_test), cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.workers,
                  pin=device.type == "cuda")


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
    store: PerturbationStore | None = None  # carried perturbations (attack.train.carry); None: a new one if carrying

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = self._new_store()

    def _new_store(self) -> PerturbationStore | None:
        """An empty store of the training set's perturbations when the training attack carries them, else None."""
        attack = self.cfg.attack.train
        if not attack.carry or attack.method == "none":
            return None
        return PerturbationStore.make(len(self.train.dataset), self.train.dataset[0][0].shape, attack.eps, self.device, self.ranks)

    def carried_after(self, stage: str) -> PerturbationStore | None:
        """A new store holding the perturbations as ``stage``'s checkpoint saved them (none saved: empty),
        for a model that continues from that stage's end on its own (compress's dense control)."""
        store = self._new_store()
        saved = self.run.load_checkpoint(stage).get("store") if store is not None and self.run.has_checkpoint(stage) else None
        if saved is not None:
            store.load_state_dict(saved)
        return store

    def validate(self) -> dict[str, Any]:
        """The judge's selection figures on the validation split (clean, PGD with restarts at the
        rule step), computed on rank 0 and the same on every rank (they choose the best epoch)."""
        return self.ranks.from_main(self._selection)

    def _selection(self) -> dict[str, Any]:
        verdict = judge.select(self.model, self.val, self.cfg.attack.eval, self.device, self.cfg.seed)
        return {"val_clean": verdict.clean.accuracy, "val_robust": verdict.robust.accuracy, "val_attack": verdict.robust.label}

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
            # Where the uninterrupted run's next stage starts: the global generators and the shuffle
            # generator as this stage left them (a fresh loader's shuffle would reorder every later epoch).
            state.restore_rng(self.cfg.seed)
            self.train.generator.set_state(state.shuffle)
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

    def budget_matched(self, prefix: str = "", hooks: Hooks = Hooks(), extra: Stateful | None = None) -> None:
        """Train for the ADMM and retraining stages' epochs, eps ramps, optimizers and schedules, without
        ADMM's penalty (stages ``{prefix}admm`` and ``{prefix}retrain``).

        What a model compared with rapc's pipeline trains after its pretraining, so that it ends on the
        same learning-rate schedule and the same full-eps epochs as the compressed model: compress's
        dense control, and the study's rows. ``hooks`` and ``extra`` (a MaskSet's) apply in both stages.
        Like the pipeline's ADMM stage, the first keeps its last epoch; the second its best.
        """
        stages = self.cfg.stages
        self.stage(f"{prefix}admm", stages.admm, hooks, extra=extra, select_best=False)
        self.stage(f"{prefix}retrain", stages.retrain, hooks, extra=extra)

    def _stage_state(self, plan: _Plan, extra: Stateful | None) -> StageState:
        """A fresh stage, or the one its checkpoint in the run directory saved."""
        attack_cfg = self.cfg.attack.train
        optimizer = make_optimizer(self.model.parameters(), plan.config.optimizer)
        steps = len(self.train) * (attack_cfg.steps if attack_cfg.method == "free" else 1)  # optimizer steps an epoch
        state = StageState(
            self.model, optimizer, make_schedule(optimizer, plan.config.schedule, steps, plan.config.epochs),
            scaler=torch.amp.GradScaler(self.device.type) if self.cfg.precision == "fp16" else None,
            guard=(
                OverfitGuard(self.guard_batch, _guard_attack(self.cfg), attack_cfg.guard.drop)
                if attack_cfg.fast and attack_cfg.guard.enabled
                else None
            ),
            extra=extra, shuffle=self.train.generator.get_state(), ranks=self.ranks, store=self.store,
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
            self.train_model or self.model, batches,
            Step(state.optimizer, state.schedule, attack, self.cfg.precision, state.scaler, plan.hooks, self.store),
            reporter=self.reporter, totals=state.totals,
            save_points=SavePoints(save_inside, self.cfg.stages.checkpoint_every_steps, agreed_stop(self.ranks, stop, self.device)),
            reduce=(lambda totals: totals.summed(self.ranks.all_sum)) if self.ranks.enabled else None,
        )
        record["train_seconds"] = time.perf_counter() - start
        if plan.after_epoch is not None:
            record |= plan.after_epoch()

        # Validation costs more passes than a fast training epoch (PGD with restarts on the whole split): it
        # runs where it decides something. A stage that keeps its best epoch chooses among those trained at
        # full eps (a clean or eps-ramp epoch does not hold the judge's eps better than the epochs after it);
        # every stage's last epoch is validated, the figures it hands on (the hard prune's reference).
        candidate = attack_cfg.method == "none" or (attack is not None and attack.eps >= attack_cfg.eps)
        validate = epoch == plan.config.epochs or (plan.select_best and candidate)

        def measure() -> dict[str, Any]:  # on rank 0 only: the guard's PGD draws random starts
            figures = (self._selection() if validate else {}) | {"sparsity": sparsity(self.model)}
            if state.guard is not None and state.epoch_start is not None:
                # at full eps the epoch's training accuracy (against its FGSM) is comparable with the guard's PGD
                at_full_eps = attack is not None and attack.eps >= attack_cfg.eps >= self.cfg.attack.eval.eps
                fgsm = record["train_acc"] if at_full_eps else None
                figures["guard_pgd"], figures["catastrophic_overfitting"] = state.guard.check(self.model, fgsm)
            return figures

        record |= self.ranks.from_main(measure)
        collapsed = record.get("catastrophic_overfitting", False)
        record["seconds"] = time.perf_counter() - start
        self.run.log(record)
        self.reporter.end(_epoch_line(record, plan.config.epochs))
        if collapsed:
            self.reporter.log(f"warning: {name} epoch {epoch}: PGD accuracy on a training batch collapsed or stayed far below FGSM's "
                              f"({record['guard_pgd']:.1%} vs {record['train_acc']:.1%}): catastrophic overfitting of FGSM training")
            if attack_cfg.guard.action == "stop":
                self.model.load_state_dict(state.epoch_start)
                self.reporter.log(f"{name}: stopped; kept the weights of epoch {epoch - 1}")
                return True
        if plan.select_best and validate:
            score = record["val_robust"] if attack_cfg.method != "none" else record["val_clean"]
            if score >= state.best_score:
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
    line = f"{record['stage']:8s} {record['epoch']}/{epochs}  loss {record['loss']:.3f}  acc {record['train_acc']:.3f}"
    if "val_robust" in record:
        line += f"  val clean {record['val_clean']:.3f} {record['val_attack']} {record['val_robust']:.3f}"
    if "residuals" in record:
        line += f"  rho {record['rho']:.3g}  residual {max(record['residuals'].values()):.3f}"
    return line + f"  {record['seconds']:.0f}s"


def _guard_attack(cfg: Config) -> AttackConfig:
    """The guard's PGD: attack.eval's eps, the guard's steps at the rule step, one restart."""
    return AttackConfig(method="pgd", eps=cfg.attack.eval.eps, steps=cfg.attack.train.guard.steps, restarts=1,
                        random_start=cfg.attack.eval.random_start)


def eps_epochs(attack: TrainAttackConfig, stage: StageConfig) -> tuple[int, int, int]:
    """(clean, ramp, full-eps) epochs of ``stage`` as the trainer runs them (all clean when ``attack`` is none);
    a stage that the overfitting guard stops early trains fewer."""
    attacks = [_epoch_attack(attack, stage, epoch) for epoch in range(1, stage.epochs + 1)]
    clean, full = sum(a is None for a in attacks), sum(a is attack for a in attacks)
    return clean, stage.epochs - clean - full, full


def _epoch_attack(attack: TrainAttackConfig, stage: StageConfig, epoch: int) -> TrainAttackConfig | None:
    """The training attack of an epoch: none in clean epochs, eps (and step) scaled up during the ramp."""
    adversarial_epoch = epoch - stage.clean_epochs
    if adversarial_epoch < 1 or attack.method == "none":
        return None
    if adversarial_epoch > stage.eps_ramp_epochs:
        return attack
    scale = adversarial_epoch / (stage.eps_ramp_epochs + 1)
    return attack.model_copy(update={"eps": attack.eps * scale, "step": attack.step and attack.step * scale})
