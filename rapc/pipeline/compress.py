"""``rapc compress``: dense adversarial training -> adversarial ADMM -> hard prune ->
masked adversarial retraining -> physical shrink, written to one run directory.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from rapc.modelio import Architecture, load_weights, read_architecture, resolve_model_dir, save_model, WEIGHTS
from rapc.pipeline.admm import AdmmState
from rapc.pipeline.guard import OverfitGuard
from rapc.pipeline.loop import Hooks, make_optimizer, make_schedule, train_epoch
from rapc.pipeline.masks import MaskSet
from rapc.pipeline.measure import compare_layers, layer_stats, sparsity, summary
from rapc.pipeline.projection import Projector
from rapc.pipeline.shrink import shrink
from rapc.progress import Reporter, SilentReporter
from rapc.rundir import RunDir


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


@dataclass
class Trainer:
    """What every stage shares: the model, data, attack settings, run directory and progress."""

    cfg: Config
    model: nn.Module
    device: torch.device
    run: RunDir
    train: DataLoader
    val: DataLoader
    guard_batch: tuple[torch.Tensor, torch.Tensor]
    reporter: Reporter = field(default_factory=SilentReporter)

    def validate(self) -> dict[str, float]:
        return evaluate(self.model, self.val, self.cfg.attack.eval, self.device)

    def stage(
        self,
        name: str,
        stage: StageConfig,
        hooks: Hooks = Hooks(),
        after_epoch: Callable[[], dict[str, Any]] | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        select_best: bool = True,
    ) -> None:
        """Train ``stage.epochs`` epochs; keep the epoch with the best validation robust accuracy if asked."""
        if stage.epochs == 0:
            return
        attack_cfg = self.cfg.attack.train
        optimizer = make_optimizer(self.model.parameters(), stage.optimizer)
        schedule = make_schedule(optimizer, stage.schedule, len(self.train), stage.epochs)
        scaler = torch.amp.GradScaler(self.device.type) if self.cfg.precision == "fp16" else None
        guard = (
            OverfitGuard(self.guard_batch, self.cfg.attack.eval, attack_cfg.guard.drop)
            if attack_cfg.method == "fgsm" and attack_cfg.guard.enabled
            else None
        )
        best_score, best_state = -1.0, None
        for epoch in range(1, stage.epochs + 1):
            attack = _epoch_attack(attack_cfg, stage, epoch)
            before = copy.deepcopy(self.model.state_dict()) if guard and attack else None
            self.reporter.begin(f"{name} {epoch}/{stage.epochs}", len(self.train))
            start = time.perf_counter()
            record: dict[str, Any] = {"stage": name, "epoch": epoch, "train_eps": attack.eps if attack else 0.0, "lr": optimizer.param_groups[0]["lr"]}
            record |= train_epoch(
                self.model, self.train, optimizer, schedule, attack=attack, device=self.device,
                precision=self.cfg.precision, scaler=scaler, hooks=hooks, reporter=self.reporter,
            )
            record["train_seconds"] = time.perf_counter() - start
            if after_epoch is not None:
                record |= after_epoch()
            val = self.validate()
            record |= {"val_clean": val["clean"], "val_robust": val["robust"], "sparsity": sparsity(self.model)}
            collapsed = False
            if guard is not None and before is not None:
                record["guard_pgd"], collapsed = guard.check(self.model)
                record["catastrophic_overfitting"] = collapsed
            record["seconds"] = time.perf_counter() - start
            self.run.log(record)
            self.reporter.end(_epoch_line(record, stage.epochs))
            if collapsed:
                self.reporter.log(f"[yellow]warning[/]: {name} epoch {epoch}: PGD accuracy on a training batch collapsed (catastrophic overfitting of FGSM training)")
                if attack_cfg.guard.action == "stop":
                    self.model.load_state_dict(before)
                    self.reporter.log(f"{name}: stopped; kept the weights of epoch {epoch - 1}")
                    break
            score = val["robust"] if attack_cfg.method != "none" else val["clean"]
            if select_best and score >= best_score:
                best_score, best_state = score, copy.deepcopy(self.model.state_dict())
            self.run.save_checkpoint(name, {"model": self.model.state_dict(), "epoch": epoch, **(extra_state() if extra_state else {})})
        if select_best and best_state is not None:
            self.model.load_state_dict(best_state)


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


def compress(cfg: Config, out: str | Path, reporter: Reporter | None = None) -> CompressResult:
    """Run the whole pipeline; everything is written under ``out``."""
    reporter = reporter or SilentReporter()
    run = RunDir(out)
    run.write_config(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    splits = load_data(cfg.data, cfg.seed)
    architecture = architecture_for(cfg, splits)
    model = architecture.build(allow_import=cfg.model.allow_import).to(device)
    pin = device.type == "cuda"
    train = loader(splits.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.data.workers, pin=pin)
    val = loader(head(splits.val, cfg.eval.n_val), cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.workers, pin=pin)
    test = loader(head(splits.test, cfg.eval.n_test), cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.workers, pin=pin)
    guard_batch = next(iter(loader(splits.train, 256, shuffle=False)))
    example = next(iter(val))[0][:64].to(device)
    _check_input(model, example, cfg)
    trainer = Trainer(cfg, model, device, run, train, val, guard_batch, reporter)

    if cfg.stages.start_from:
        _start_weights(model, cfg.stages.start_from)
    trainer.stage("pretrain", cfg.stages.pretrain)
    dense = copy.deepcopy(model).eval()
    save_model(dense, architecture, run.dense)

    projector = Projector(model, example, cfg.pruning)
    for note in projector.notes:
        reporter.log(f"note: {note}")
    params = dict(model.named_parameters())
    admm = AdmmState.start(params, projector, cfg.admm.rho)
    step_updates = cfg.admm.update_unit == "step"
    counter = {"steps": 0, "epochs": 0}

    def admm_step() -> None:
        counter["steps"] += 1
        if step_updates and counter["steps"] % cfg.admm.update_every == 0:
            admm.update(params, projector, cfg.admm)

    def admm_epoch() -> dict[str, Any]:
        counter["epochs"] += 1
        if not step_updates and counter["epochs"] % cfg.admm.update_every == 0:
            admm.update(params, projector, cfg.admm)
        return {"rho": admm.rho, "admm_updates": admm.updates, "residuals": admm.residuals(params)}

    trainer.stage(
        "admm", cfg.stages.admm, Hooks(penalty=lambda: admm.penalty(params), after_step=admm_step),
        after_epoch=admm_epoch, extra_state=lambda: {"admm": admm.state_dict()}, select_best=False,
    )

    masks = MaskSet(model, projector.masks({n: params[n] for n in projector.targets}, params))
    masks.apply()
    hard = trainer.validate()
    run.log({"stage": "hard_prune", "val_clean": hard["clean"], "val_robust": hard["robust"], "sparsity": sparsity(model)})
    reporter.log(f"hard prune: val clean/PGD {hard['clean']:.3f}/{hard['robust']:.3f}  sparsity {sparsity(model):.3f}")
    trainer.stage(
        "retrain", cfg.stages.retrain, Hooks(before_step=masks.mask_grads, after_step=masks.apply),
        extra_state=lambda: {"masks": masks.state_dict()},
    )

    model.eval()
    result = shrink(model, example, cfg.shrink)
    save_model(result.model, Architecture(architecture.builder, architecture.args, architecture.input_shape, result.history), run.model)
    reporter.log(f"shrink: removed {sum(result.removed.values())} channels, max abs diff {result.max_abs_diff:.2e}")

    reporter.begin("evaluating on the test split", 2)
    dense_report = _report(dense, test, cfg, device, example, run.dense / WEIGHTS)
    reporter.advance()
    compressed_report = _report(result.model, test, cfg, device, example, run.model / WEIGHTS)
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
