"""How fast rapc trains, and how much faster its shrunk models run, measured in one run.

1. Adversarial training speed of the default preset (``mnist-lenet-filter``: LeNet w=16 on
   mnist5k, batch 64) with the library's own loop (``rapc.pipeline.loop.train_epoch``):
   a clean epoch (reference), a PGD-k epoch exactly as the preset's ``attack.train``
   configures it, the same plus the ADMM proximal penalty (the ``admm`` stage's optimizer,
   and the once-per-epoch Z/U update timed separately and added), and an FGSM-RS epoch
   (``attack.train.method=fgsm``). The modes are timed interleaved, each on its own model.
   By default a fixed number of batches is timed and the seconds per epoch are
   extrapolated (train images / measured images/s); ``--epochs N`` times N whole epochs
   instead. Only training is timed: compress()'s per-epoch validation, checkpoints and
   FGSM overfitting guard are not part of these figures.
2. Dense vs shrunk inference on PyTorch CPU at batch 1 and 64: the dense LeNet is hard
   pruned with the preset's Projector masks (filter, ratio 0.5) and physically shrunk
   with ``rapc.pipeline.shrink.shrink``, as compress() does (random weights: latency does
   not depend on them). They are timed with rapc bench's ``torch-eager`` backend and
   ``rapc.bench.latency.measure``, interleaved, so the speedup is a ratio from one run;
   it is printed beside the MAC ratio of ``rapc.pipeline.measure.macs_and_params``.
3. Optionally the same for other registry models on random data, e.g. a CIFAR-sized
   ResNet-18 (w=16): ``--model resnet18 --data-shape 3,32,32``.

Training steps are timed with ``time_calls`` below and inference with rapc bench's
``measure``; both warm up, then time each call with ``time.perf_counter`` until a
minimum count and a minimum time are reached; mean, p50 and p90 are reported.

Run from the repository root:

    .venv/bin/python benchmarks/compress_speed.py
    .venv/bin/python benchmarks/compress_speed.py --model resnet18 --data-shape 3,32,32 --json speed.json
    .venv/bin/python benchmarks/compress_speed.py --epochs 1     # time whole epochs, no extrapolation
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from rapc.bench.backends import Artifact
from rapc.bench.latency import TimingPolicy, build_backends, measure
from rapc.config import DEFAULT_PRESET, Config, StageConfig, TrainAttackConfig, load_config
from rapc.data import Splits, load_data, loader
from rapc.modelio import Architecture
from rapc.models import MODELS
from rapc.pipeline.admm import AdmmState
from rapc.pipeline.compress import architecture_for, resolve_device, seed_everything
from rapc.pipeline.loop import Hooks, make_optimizer, make_schedule, train_epoch
from rapc.pipeline.masks import MaskSet
from rapc.pipeline.measure import macs_and_params
from rapc.pipeline.projection import Projector
from rapc.pipeline.shrink import shrink

INFERENCE_BATCHES = (1, 64)
EXTRA_CLASSES = 10
PLURAL = {"batch": "batches", "epoch": "epochs"}
progress = Console(stderr=True)


@dataclass(frozen=True)
class Timing:
    warmup: int
    min_iters: int
    min_seconds: float


EPOCH_END_TIMING = Timing(warmup=1, min_iters=5, min_seconds=0.0)  # ADMM's Z/U update, once per epoch


@dataclass(frozen=True)
class Stats:
    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        ms = np.asarray(seconds) * 1e3
        p50, p90 = np.percentile(ms, [50, 90])
        return cls(len(ms), float(ms.mean()), float(p50), float(p90))


def time_calls(calls: Mapping[str, Callable[[], object]], timing: Timing) -> dict[str, Stats]:
    """Call each function in turn (interleaved): ``warmup`` rounds, then timed rounds until
    at least ``min_iters`` rounds and ``min_seconds`` of wall time; seconds per call.

    The calls must finish their work before returning (train_epoch reads its loss, CPU
    inference is synchronous), so perf_counter around a call measures the call.
    """
    for _ in range(timing.warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    rounds, start = 0, time.perf_counter()
    while rounds < timing.min_iters or time.perf_counter() - start < timing.min_seconds:
        for name, call in calls.items():
            begin = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - begin)
        rounds += 1
    return {name: Stats.of(seconds) for name, seconds in samples.items()}


# --- 1. training speed -------------------------------------------------------------------


@dataclass
class TrainMode:
    name: str
    call: Callable[[], object]  # one train_epoch over one batch, or over the whole loader
    epoch_end: Callable[[], object] | None = None  # once-per-epoch work outside train_epoch


def _cycle(data: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from data


def _trainer(cfg: Config, model: nn.Module, data: DataLoader, device: torch.device, stage: StageConfig,
             attack: TrainAttackConfig | None, hooks: Hooks, whole_epochs: bool) -> Callable[[], object]:
    """A call of train_epoch set up as compress()'s Trainer.stage does, on the next batch or a whole epoch."""
    optimizer = make_optimizer(model.parameters(), stage.optimizer)
    schedule = make_schedule(optimizer, stage.schedule, len(data), stage.epochs)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    batches = _cycle(data)

    def call() -> dict[str, float]:
        source = data if whole_epochs else [next(batches)]
        return train_epoch(model, source, optimizer, schedule, attack=attack, device=device,
                           precision=cfg.precision, scaler=scaler, hooks=hooks)

    return call


def _admm_hooks(cfg: Config, model: nn.Module, example: torch.Tensor) -> tuple[Hooks, Callable[[], object]]:
    """compress()'s ADMM wiring for the preset (update_unit=epoch): the penalty every step,
    the Z/U update and residuals at the end of the epoch."""
    projector = Projector(model, example, cfg.pruning)
    params = dict(model.named_parameters())
    admm = AdmmState.start(params, projector, cfg.admm.rho)

    def epoch_end() -> dict[str, float]:
        admm.update(params, projector, cfg.admm)
        return admm.residuals(params)

    return Hooks(penalty=lambda: admm.penalty(params)), epoch_end


def _attack_name(attack: TrainAttackConfig) -> str:
    name = f"PGD-{attack.steps}" if attack.method == "pgd" else "FGSM-RS"
    return f"{name} (eps {attack.eps:g}, step {attack.step_size:g})"


def train_modes(cfg: Config, splits: Splits, device: torch.device, whole_epochs: bool) -> list[TrainMode]:
    """Clean, PGD, ADMM + PGD and FGSM-RS training, each on its own freshly built model and loader."""
    architecture = architecture_for(cfg, splits)
    pgd = cfg.attack.train
    fgsm = pgd.model_copy(update={"method": "fgsm"})
    stages = cfg.stages

    def mode(name: str, stage: StageConfig, attack: TrainAttackConfig | None, admm: bool = False) -> TrainMode:
        model = architecture.build().to(device)
        data = loader(splits.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.data.workers, pin=device.type == "cuda")
        hooks, epoch_end = _admm_hooks(cfg, model, next(iter(data))[0].to(device)) if admm else (Hooks(), None)
        return TrainMode(name, _trainer(cfg, model, data, device, stage, attack, hooks, whole_epochs), epoch_end)

    return [
        mode("clean (reference)", stages.pretrain, None),
        mode(_attack_name(pgd), stages.pretrain, pgd),
        mode(f"ADMM + {_attack_name(pgd)}", stages.admm, pgd, admm=True),
        mode(_attack_name(fgsm), stages.pretrain, fgsm),
    ]


def measure_training(cfg: Config, splits: Splits, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    whole_epochs = args.epochs > 0
    modes = train_modes(cfg, splits, device, whole_epochs)
    n_images = len(splits.train)  # type: ignore[arg-type]
    per_call = n_images if whole_epochs else cfg.data.batch_size
    progress.print(f"training: timing {len(modes)} modes interleaved, "
                   + (f"{args.epochs} whole epoch(s) each" if whole_epochs else f"{args.limit_batches} batches each"))
    timing = Timing(warmup=1 if whole_epochs else args.warmup, min_iters=args.epochs or args.limit_batches, min_seconds=0.0)
    stats = time_calls({m.name: m.call for m in modes}, timing)
    rows = []
    for mode in modes:
        s = stats[mode.name]
        end_ms = time_calls({"end": mode.epoch_end}, EPOCH_END_TIMING)["end"].mean_ms if mode.epoch_end else 0.0
        images_per_s = per_call / (s.mean_ms / 1e3)
        rows.append({"mode": mode.name, **asdict(s), "images_per_s": images_per_s,
                     "epoch_seconds": n_images / images_per_s + end_ms / 1e3, "epoch_end_ms": end_ms})
    pgd_seconds = next(r["epoch_seconds"] for r in rows if r["mode"] == _attack_name(cfg.attack.train))
    for row in rows:
        row["epoch_vs_pgd"] = row["epoch_seconds"] / pgd_seconds
    return {
        "preset": DEFAULT_PRESET, "device": str(device), "batch_size": cfg.data.batch_size,
        "train_images": n_images, "batches_per_epoch": math.ceil(n_images / cfg.data.batch_size),
        "timed_unit": "epoch" if whole_epochs else "batch", "extrapolated": not whole_epochs,
        "attack": cfg.attack.train.model_dump(exclude={"guard"}), "timing": asdict(timing), "rows": rows,
    }


# --- 2./3. dense vs shrunk inference -------------------------------------------------------


def hard_prune_and_shrink(model: nn.Module, example: torch.Tensor, cfg: Config) -> tuple[nn.Module, nn.Module]:
    """(dense copy, shrunk model): the Projector's masks applied with MaskSet, then shrink(), as in compress()."""
    dense = copy.deepcopy(model).eval()
    projector = Projector(model, example, cfg.pruning)
    params = dict(model.named_parameters())
    MaskSet(model, projector.masks({n: params[n] for n in projector.targets}, params)).apply()
    return dense, shrink(model.eval(), example, cfg.shrink).model.eval()


def compare_inference(label: str, model: nn.Module, example: torch.Tensor, cfg: Config, timing: TimingPolicy) -> list[dict[str, Any]]:
    """Dense vs shrunk with rapc bench's own torch-eager backend and interleaved timing."""
    progress.print(f"inference: {label}: hard prune + shrink, then timing dense vs shrunk at batch {', '.join(map(str, INFERENCE_BATCHES))}")
    dense, shrunk = hard_prune_and_shrink(model, example, cfg)
    costs = {"dense": macs_and_params(dense, example), "shrunk": macs_and_params(shrunk, example)}
    shape = tuple(example.shape[1:])
    backends, _ = build_backends(["torch-eager"], [Artifact("dense", dense, shape), Artifact("shrunk", shrunk, shape)])
    rows = []
    for batch in INFERENCE_BATCHES:
        stats = {r.artifact: r for r in measure(backends, batch, timing)}
        for variant, s in stats.items():
            macs, params = costs[variant]
            rows.append({"model": label, "batch": batch, "variant": variant, "macs": macs, "params": params, **s.as_dict(),
                         "speedup_mean": stats["dense"].mean_ms / s.mean_ms, "speedup_p50": stats["dense"].p50_ms / s.p50_ms,
                         "mac_ratio": costs["dense"][0] / macs})
    return rows


def preset_inference(cfg: Config, splits: Splits, timing: TimingPolicy) -> list[dict[str, Any]]:
    example = next(iter(loader(splits.val, max(INFERENCE_BATCHES), shuffle=False)))[0]
    model = architecture_for(cfg, splits).build()
    return compare_inference(f"{cfg.model.name} w={cfg.model.width}", model, example, cfg, timing)


def extra_inference(name: str, shape: tuple[int, int, int], width: int, cfg: Config, timing: TimingPolicy) -> list[dict[str, Any]]:
    """A registry model on random images of ``shape``, pruned with the preset's pruning config."""
    channels, height, _ = shape
    args = {"num_classes": EXTRA_CLASSES, "in_channels": channels, "image_size": height, "width": width,
            "mean": [0.5] * channels, "std": [0.25] * channels}
    model = Architecture(name, args, list(shape)).build()
    example = torch.rand(max(INFERENCE_BATCHES), *shape)
    return compare_inference(f"{name} w={width}", model, example, cfg, timing)


# --- output ----------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.__version__, "num_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(), "train_device": str(device),
            "load_average_1min_at_start": os.getloadavg()[0]}


def training_table(training: dict[str, Any]) -> Table:
    unit = training["timed_unit"]
    how = (f"s/epoch extrapolated: {training['train_images']} train images / measured images/s" if training["extrapolated"]
           else "s/epoch measured over whole epochs")
    title = (f"adversarial training, {training['preset']} (batch {training['batch_size']}, "
             f"{training['batches_per_epoch']} batches/epoch, {training['device']})")
    admm_end = max(r["epoch_end_ms"] for r in training["rows"])
    table = Table(title=title, caption=f"ms per timed {unit}; {how}; ADMM's s/epoch includes its epoch-end Z/U update ({admm_end:.1f} ms)")
    for column in ("mode", "timed", "mean ms", "p50 ms", "p90 ms", "images/s", "s/epoch", "epoch vs PGD"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for r in training["rows"]:
        table.add_row(r["mode"], f"{r['n']} {unit if r['n'] == 1 else PLURAL[unit]}", f"{r['mean_ms']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}",
                      f"{r['images_per_s']:,.0f}", f"{r['epoch_seconds']:.2f}", f"{r['epoch_vs_pgd']:.2f}x")
    return table


def inference_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"dense vs shrunk inference, PyTorch CPU, {torch.get_num_threads()} threads",
                  caption="speedup = dense latency / shrunk latency (same run, interleaved); MAC ratio = dense MACs / shrunk MACs")
    for column in ("model", "batch", "variant", "params", "MMACs", "iters", "mean ms", "p50 ms", "p90 ms", "images/s",
                   "speedup mean", "speedup p50", "MAC ratio"):
        table.add_column(column, justify="left" if column in ("model", "variant") else "right")
    for r in rows:
        shrunk = r["variant"] == "shrunk"
        table.add_row(r["model"], str(r["batch"]), r["variant"], f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}", str(r["n"]),
                      f"{r['mean_ms']:.3f}", f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['images_per_s']:,.0f}",
                      f"{r['speedup_mean']:.2f}x" if shrunk else "", f"{r['speedup_p50']:.2f}x" if shrunk else "",
                      f"{r['mac_ratio']:.2f}x" if shrunk else "")
    return table


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        channels, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}") from None
    if height != width:
        raise argparse.ArgumentTypeError(f"rapc models take square images, got {height}x{width}")
    return channels, height, width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train = parser.add_argument_group("training speed (default preset)")
    train.add_argument("--limit-batches", type=int, default=50, metavar="N", help="timed training batches per mode; s/epoch is extrapolated")
    train.add_argument("--epochs", type=int, default=0, metavar="N", help="time N whole epochs per mode instead of --limit-batches (after 1 warm-up epoch)")
    timing = parser.add_argument_group("timing (warm-up also applies to training batches)")
    timing.add_argument("--warmup", type=int, default=3, metavar="N", help="warm-up calls before timing")
    timing.add_argument("--min-iters", type=int, default=10, metavar="N", help="inference: at least N timed calls per model and batch size")
    timing.add_argument("--min-seconds", type=float, default=2.0, metavar="S", help="inference: and at least S seconds of timing")
    timing.add_argument("--threads", type=int, default=None, metavar="N", help="torch.set_num_threads(N) before measuring; None keeps PyTorch's default")
    extra = parser.add_argument_group("extra models for dense vs shrunk inference (off by default)")
    extra.add_argument("--model", action="append", default=[], choices=list(MODELS), metavar="NAME",
                       help=f"registry model on random data, repeatable: {', '.join(MODELS)}")
    extra.add_argument("--data-shape", type=parse_shape, default=(3, 32, 32), metavar="C,H,W", help="image shape for --model")
    extra.add_argument("--width", type=int, default=16, metavar="W", help="width multiplier w for --model")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.limit_batches < 1 or args.epochs < 0 or args.min_iters < 1 or args.warmup < 0:
        parser.error("--limit-batches and --min-iters must be >= 1, --epochs and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    splits = load_data(cfg.data, cfg.seed)
    env = environment(device)
    progress.print(f"torch {env['torch']}, {env['num_threads']} threads, {env['cpu_count']} CPUs; training on {device}")

    training = measure_training(cfg, splits, device, args)
    timing = TimingPolicy(warmup=args.warmup, min_iters=args.min_iters, min_seconds=args.min_seconds)
    inference = preset_inference(cfg, splits, timing)
    for name in args.model:
        inference += extra_inference(name, args.data_shape, args.width, cfg, timing)
    total = time.perf_counter() - started
    env["load_average_1min_at_end"] = os.getloadavg()[0]

    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(f"torch {env['torch']}  torch.get_num_threads()={env['num_threads']}  os.cpu_count()={env['cpu_count']}  "
                  f"{env['machine']}  python {env['python']}")
    console.print(f"load average (1 min): {env['load_average_1min_at_start']:.2f} at start, {env['load_average_1min_at_end']:.2f} at end "
                  "(other busy processes skew every figure)")
    console.print(training_table(training))
    console.print(inference_table(inference))
    console.print(f"total runtime {total:.1f} s")
    if args.json:
        figures = {"environment": env, "training": training, "inference": inference,
                   "inference_timing": asdict(timing), "total_seconds": total}
        args.json.write_text(json.dumps(figures, indent=1))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
