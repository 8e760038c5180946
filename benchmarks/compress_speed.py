"""How fast rapc trains and how much memory it takes, and how much faster its compressed (shrunk) models run
on every inference backend, measured in one run.

What is measured: the config's model on its dataset (default: the preset ``mnist-lenet-filter``,
LeNet w=16 on mnist5k, batch 64), and with ``--model NAME`` a registry model on random images of
``--data-shape``, trained and pruned with the same config otherwise.

1. Training per mode: clean (reference), PGD-k as the config's ``attack.train`` sets it, FGSM-RS,
   and each attack with ADMM (the admm stage's optimizer, ``AdmmSchedule``'s penalty and its
   once-per-epoch Z/U update, timed apart and added). Each mode has its own model and loader, set
   up as compress() sets up a stage, and trains through ``train_epoch`` and ``training_module``.
   All modes, and the ``--compare`` config variants, are timed interleaved
   (``rapc.bench.latency.time_interleaved``): each call trains ``--chunk`` batches (or, with
   ``--epochs``, a whole epoch); s/epoch = train images / images/s (+ the Z/U update).
   compress()'s validation and checkpoints are not part of it.
2. Peak memory per mode and variant over ``--memory-steps`` training steps, each in a fresh
   spawned process (``rapc.bench.memory``).
3. Inference, dense vs compressed: the config's architecture (random weights: latency does not
   depend on them) hard pruned and physically shrunk as compress() does, exported to ONNX (and
   TensorRT engines where they can run) and timed on every requested ``rapc bench`` backend per
   batch size (``rapc.bench.latency``), beside the MAC and parameter ratios.

Run from the repository root; every figure is printed, ``--json PATH`` also writes them:

    .venv/bin/python benchmarks/compress_speed.py
    .venv/bin/python benchmarks/compress_speed.py --model resnet18 --data-shape 3,32,32
    .venv/bin/python benchmarks/compress_speed.py --compare "precision=bf16 channels_last=true"   # on a GPU

Measured figures, each with its command, machine and date: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from rapc.bench import memory
from rapc.bench.backends import BACKENDS
from rapc.bench.latency import TimingPolicy, TimingStats, backends_for_models, measure_backends, time_interleaved
from rapc.bench.report import skipped_lines
from rapc.bench.run import machine, speedups
from rapc.config import DEFAULT_PRESET, Config, StageConfig, TrainAttackConfig, load_config
from rapc.data import Splits, load_data, random_splits
from rapc.device import resolve_device, seed_everything
from rapc.errors import RapcError
from rapc.measure import summary
from rapc.modelio import Architecture
from rapc.models import MODELS
from rapc.pipeline.admm import AdmmSchedule
from rapc.pipeline.distributed import Ranks
from rapc.pipeline.loop import Hooks, Step, make_optimizer, make_schedule, train_epoch
from rapc.pipeline.masks import hard_prune
from rapc.pipeline.projection import Projector
from rapc.pipeline.shrink import shrink
from rapc.pipeline.training_module import training_module
from rapc.pipeline.trainer import RunData
from rapc.progress import RichReporter
from rapc.tables import Table

MODES = ("clean", "pgd", "admm-pgd", "fgsm", "admm-fgsm")
BATCH_SIZES = (1, 8, 64, 256)
MODEL_BATCH_SIZES_CPU = (1, 8, 32)  # --model on a CPU: a ResNet-18 at 256 images takes seconds per call
RANDOM_IMAGES = 45_000  # CIFAR-10's 50,000 training images less rapc's 10% validation split
EPOCH_END_TIMING = TimingPolicy(warmup=1, min_iters=5, min_seconds=0.0, max_seconds=math.inf)  # ADMM's Z/U update
progress = Console(stderr=True)


@dataclass(frozen=True)
class Subject:
    """What is measured: the config's model on its data, or (``shape`` set) registry model ``model``
    on random images. Plain data, so that a memory probe can rebuild it in a fresh process."""

    config: str
    overrides: tuple[str, ...] = ()
    model: str | None = None
    width: int = 16
    shape: tuple[int, int, int] | None = None
    random_images: int = RANDOM_IMAGES

    def config_with(self, variant: tuple[str, ...] = ()) -> Config:
        model = () if self.model is None else (f"model.name={self.model}", f"model.width={self.width}")
        return load_config(self.config, [*self.overrides, *model, *variant])

    def splits(self, cfg: Config) -> Splits:
        return load_data(cfg.data, cfg.seed) if self.shape is None else random_splits(self.shape, self.random_images, seed=cfg.seed)

    def label(self, cfg: Config) -> str:
        data = cfg.data.name if self.shape is None else f"random {'x'.join(map(str, self.shape))} images"
        return f"{cfg.model.name} w={cfg.model.width} on {data}"


# --- 1. training speed and memory --------------------------------------------------------------


@dataclass
class TrainMode:
    name: str
    call: Callable[[], object]  # train_epoch over the next --chunk batches, or over the whole loader
    batches_per_call: int
    images_per_call: int
    epoch_end: Callable[[], object] | None = None  # once-per-epoch work outside train_epoch


def _cycle(data: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from data


def _mode_setup(cfg: Config, key: str) -> tuple[str, StageConfig, TrainAttackConfig | None]:
    """A mode's name, the stage whose optimizer it uses and its attack."""
    attacks = {"clean": None, "pgd": cfg.attack.train, "fgsm": cfg.attack.train.model_copy(update={"method": "fgsm"})}
    attack = attacks[key.removeprefix("admm-")]
    name = "clean (reference)" if attack is None else (
        f"{f'PGD-{attack.steps}' if attack.method == 'pgd' else 'FGSM-RS'} (eps {attack.eps:g}, step {attack.step_size:g})")
    if key.startswith("admm-"):
        return f"ADMM + {name}", cfg.stages.admm, attack
    return name, cfg.stages.pretrain, attack


def build_mode(key: str, cfg: Config, splits: Splits, device: torch.device, chunk: int | None) -> TrainMode:
    """One mode on its own freshly built model and loader, with the stage's optimizer, schedule and
    hooks as compress() gives them; each call trains ``chunk`` batches (None: a whole epoch)."""
    name, stage, attack = _mode_setup(cfg, key)
    model = Architecture.for_data(cfg.model, splits.info).build().to(device)
    data = RunData.make(cfg, splits, device)
    hooks, epoch_end = Hooks(), None
    if key.startswith("admm-"):
        admm = AdmmSchedule.start(dict(model.named_parameters()), Projector(model, data.example, cfg.pruning), cfg.admm)
        hooks, epoch_end = Hooks(penalty=admm.penalty, after_step=admm.after_step), admm.after_epoch
    module = training_module(model, cfg, device, Ranks())
    optimizer = make_optimizer(model.parameters(), stage.optimizer)
    step = Step(optimizer, make_schedule(optimizer, stage.schedule, len(data.train), stage.epochs), attack, cfg.precision,
                torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None, hooks)
    batches = _cycle(data.train)

    def call() -> dict[str, float]:
        # an unsized slice: train_epoch reads its sums back at its end only (and every 20 steps)
        return train_epoch(module, data.train if chunk is None else islice(batches, chunk), step)

    if chunk is None:
        return TrainMode(name, call, len(data.train), len(splits.train), epoch_end)  # type: ignore[arg-type]
    return TrainMode(name, call, chunk, chunk * cfg.data.batch_size, epoch_end)


def probe_memory(subject: Subject, variant: tuple[str, ...], key: str, steps: int, threads: int | None) -> dict[str, float]:
    """Run in a fresh process: the peak memory of ``steps`` training steps of one mode (and ADMM's
    epoch-end update), and the memory held before them, in MiB."""
    if threads:
        torch.set_num_threads(threads)
    cfg = subject.config_with(variant)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    mode = build_mode(key, cfg, subject.splits(cfg), device, chunk=1)

    def steps_and_epoch_end() -> None:
        for _ in range(steps):
            mode.call()
        if mode.epoch_end is not None:
            mode.epoch_end()

    return memory.peak_memory(steps_and_epoch_end, device).as_dict()


def variant_name(variant: tuple[str, ...]) -> str:
    return " ".join(variant) or "as configured"


def measure_training(subject: Subject, variants: list[tuple[str, ...]], args: argparse.Namespace) -> dict[str, Any]:
    """Every mode of every config variant, timed interleaved; then each one's peak memory in a fresh process."""
    chunk = None if args.epochs else args.chunk
    base = subject.config_with(variants[0])
    device = resolve_device(base.device)
    splits = subject.splits(base)
    modes: dict[tuple[tuple[str, ...], str], TrainMode] = {}
    for variant in variants:
        cfg = subject.config_with(variant)
        seed_everything(cfg.seed)
        for key in args.modes:
            modes[(variant, key)] = build_mode(key, cfg, splits, device, chunk)
    n_images = len(splits.train)  # type: ignore[arg-type]
    label = subject.label(base)
    calls = args.epochs or max(1, args.limit_batches // args.chunk)
    progress.print(f"training {label}: {len(modes)} modes interleaved, {calls} timed calls of "
                   + ("a whole epoch" if chunk is None else f"{chunk} batches") + " each, after 1 warm-up call")
    samples = time_interleaved({k: m.call for k, m in modes.items()},
                               TimingPolicy(warmup=1, min_iters=calls, min_seconds=0.0, max_seconds=math.inf))
    rows = []
    for (variant, key), mode in modes.items():
        seconds = samples[(variant, key)]
        per_batch = TimingStats.of([s / mode.batches_per_call for s in seconds])
        end_ms = TimingStats.of(time_interleaved({"end": mode.epoch_end}, EPOCH_END_TIMING)["end"]).mean_ms if mode.epoch_end else 0.0
        images_per_s = mode.images_per_call / (sum(seconds) / len(seconds))
        row = {"variant": variant_name(variant), "key": key, "mode": mode.name, **per_batch.as_dict(), "batches_per_call": mode.batches_per_call,
               "images_per_s": images_per_s, "epoch_seconds": n_images / images_per_s + end_ms / 1e3, "epoch_end_ms": end_ms}
        if args.memory_steps:
            progress.print(f"peak memory: {mode.name} ({row['variant']}), {args.memory_steps} steps in a fresh process")
            row |= memory.in_fresh_process(probe_memory, subject, variant, key, args.memory_steps, args.threads)
        rows.append(row)
    for row in rows:
        pgd = next((r for r in rows if r["variant"] == row["variant"] and r["key"] == "pgd"), None)
        row["epoch_vs_pgd"] = row["epoch_seconds"] / pgd["epoch_seconds"] if pgd else None
        as_configured = next(r for r in rows if r["key"] == row["key"])
        row["speed_vs_configured"] = row["images_per_s"] / as_configured["images_per_s"]
    return {
        "subject": label, "device": str(device), "batch_size": base.data.batch_size, "train_images": n_images,
        "batches_per_epoch": math.ceil(n_images / base.data.batch_size), "timed_unit": "epoch" if chunk is None else f"{chunk} batches",
        "extrapolated": chunk is not None, "attack": base.attack.train.model_dump(exclude={"guard"}),
        "memory_method": memory.method(device) if args.memory_steps else None, "memory_steps": args.memory_steps, "rows": rows,
    }


# --- 2. dense vs compressed inference ---------------------------------------------------------


def hard_prune_and_shrink(model: nn.Module, example: torch.Tensor, cfg: Config) -> tuple[nn.Module, nn.Module]:
    """(dense copy, shrunk model): compress()'s hard prune, then shrink()."""
    dense = copy.deepcopy(model).eval()
    hard_prune(model, Projector(model, example, cfg.pruning))
    return dense, shrink(model.eval(), example, cfg.shrink).model.eval()


def measure_inference(subject: Subject, batch_sizes: tuple[int, ...], args: argparse.Namespace, reporter: RichReporter) -> dict[str, Any]:
    cfg = subject.config_with()
    seed_everything(cfg.seed)
    splits = subject.splits(cfg)
    example = RunData.make(cfg, splits, torch.device("cpu")).example
    label = subject.label(cfg)
    progress.print(f"inference {label}: hard prune + shrink, export, then dense vs compressed per backend at batch {', '.join(map(str, batch_sizes))}")
    dense, compressed = hard_prune_and_shrink(Architecture.for_data(cfg.model, splits.info).build(), example, cfg)
    models = {"dense": dense, "compressed": compressed}
    figures = {name: summary(model, example) for name, model in models.items()}
    timing = TimingPolicy(warmup=args.warmup, min_iters=args.min_iters, min_seconds=args.min_seconds)
    with tempfile.TemporaryDirectory() as folder:
        runnable, skipped = backends_for_models(args.backends, models, tuple(example.shape[1:]), Path(folder), max(batch_sizes))
        latencies = measure_backends(runnable, batch_sizes, timing, reporter)
    return {
        "subject": label, "models": figures, "timing": asdict(timing), "skipped": skipped,
        "latency": [l.as_dict() | {"noisy": l.cv > timing.cv_warning} for l in latencies],
        "speedup": speedups(latencies, figures, {"dense": "dense", "compressed": "compressed"}),
    }


# --- output ----------------------------------------------------------------------------------


def _mib(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:,.1f}" if key in row else "-"


def training_table(training: dict[str, Any]) -> Table:
    how = "extrapolated: train images / images/s" if training["extrapolated"] else "measured over whole epochs"
    title = (f"Adversarial training, {training['subject']} (batch {training['batch_size']}, {training['batches_per_epoch']} batches/epoch, "
             f"{training['device']}); ms per batch, timed {training['timed_unit']} per call; s/epoch {how}, ADMM's with its Z/U update")
    headers = ("variant", "mode", "mean ms", "p50 ms", "p90 ms", "images/s", "s/epoch", "vs PGD", "vs as configured", "peak MiB", "+MiB")
    rows = [(r["variant"], r["mode"], f"{r['mean_ms']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['images_per_s']:,.0f}",
             f"{r['epoch_seconds']:.2f}", "-" if r["epoch_vs_pgd"] is None else f"{r['epoch_vs_pgd']:.2f}x", f"{r['speed_vs_configured']:.2f}x",
             _mib(r, "peak_mib"), _mib(r, "increment_mib"))
            for r in training["rows"]]
    return Table(title, headers, rows, label_columns=2)


def inference_table(inference: dict[str, Any]) -> Table:
    speedup = {(s["backend"], s["batch"]): s for s in inference["speedup"]}
    rows = []
    for l in sorted(inference["latency"], key=lambda l: (l["backend"], l["batch"], l["artifact"])):
        s = speedup.get((l["backend"], l["batch"])) if l["artifact"] == "compressed" else None
        ratios = (f"{s['speedup']:.2f}x", f"{s['mac_ratio']:.2f}x", f"{s['param_ratio']:.2f}x") if s else ("", "", "")
        rows.append((l["backend"], str(l["batch"]), l["artifact"], str(l["n"]), f"{l['mean_ms']:.3f}", f"{l['p50_ms']:.3f}", f"{l['p90_ms']:.3f}",
                     f"{l['images_per_s']:,.0f}", f"{l['cv']:.0%}" + (" !" if l["noisy"] else ""), *ratios))
    d, s = inference["models"]["dense"], inference["models"]["compressed"]
    title = (f"Dense vs compressed inference, {inference['subject']} ({d['params']:,} -> {s['params']:,} params, "
             f"{d['macs'] / 1e6:.2f} -> {s['macs'] / 1e6:.2f} MMACs); speedup = dense / compressed mean latency, same backend, batch and run")
    headers = ("backend", "batch", "model", "n", "mean ms", "p50 ms", "p90 ms", "images/s", "CV", "speedup", "MAC ratio", "param ratio")
    return Table(title, headers, rows, label_columns=3)


def print_results(figures: dict[str, Any], console: Console) -> None:
    m = figures["machine"]
    console.print(f"{m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, torch {m['versions'].get('torch')} with "
                  f"{m['torch_threads']} threads" + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"))
    load = figures["load_average"]
    console.print(f"load average (1 min): {load['start']:.2f} at start, {load['end']:.2f} at end (other busy processes skew every figure)")
    for training in figures["training"]:
        console.print(training_table(training).rich())
        if training["memory_method"]:
            console.print(f"peak memory over {training['memory_steps']} steps: {training['memory_method']}")
    for inference in figures["inference"]:
        console.print(inference_table(inference).rich())
        for line in skipped_lines(inference["skipped"]):
            console.print(f"skipped: {line}", markup=False)  # "rapc[gpu]" is no markup
    console.print(f"total runtime {figures['total_seconds']:.1f} s")


# --- command line ------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        channels, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}") from None
    return channels, height, width


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 1,8,64, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1, got {text!r}")
    return sizes


def parse_names(known: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = text.split(",")
        if unknown := [n for n in names if n not in known]:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; known: {', '.join(known)}")
        return names
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", choices=("training", "inference"), default=None, help="measure one part only")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every figure to this JSON file")
    subject = parser.add_argument_group("what is measured")
    subject.add_argument("--config", default=DEFAULT_PRESET, metavar="PRESET", help="preset name or YAML file")
    subject.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every subject, repeatable")
    subject.add_argument("--model", action="append", default=[], choices=list(MODELS), metavar="NAME",
                         help=f"also a registry model on random data, repeatable: {', '.join(MODELS)}")
    subject.add_argument("--data-shape", type=parse_shape, default=(3, 32, 32), metavar="C,H,W", help="image shape for --model")
    subject.add_argument("--width", type=int, default=16, metavar="W", help="width multiplier w for --model")
    subject.add_argument("--random-images", type=int, default=RANDOM_IMAGES, metavar="N", help="training images for --model (s/epoch)")
    train = parser.add_argument_group("training")
    train.add_argument("--modes", type=parse_names(MODES), default=list(MODES), metavar="M,M", help=f"of {', '.join(MODES)}")
    train.add_argument("--limit-batches", type=int, default=50, metavar="N", help="timed batches per mode; s/epoch is extrapolated")
    train.add_argument("--chunk", type=int, default=5, metavar="N", help="batches per timed call (one train_epoch call)")
    train.add_argument("--epochs", type=int, default=0, metavar="N", help="time N whole epochs per mode instead (after 1 warm-up epoch)")
    train.add_argument("--compare", action="append", default=[], metavar='"KEY=VALUE ..."',
                       help="a config variant timed in the same rounds as the config itself, repeatable")
    train.add_argument("--memory-steps", type=int, default=2, metavar="N", help="training steps per peak-memory probe; 0 skips them")
    infer = parser.add_argument_group("inference")
    infer.add_argument("--backends", type=parse_names(tuple(BACKENDS)), default=list(BACKENDS), metavar="B,B",
                       help="rapc bench backends; those that cannot run here are listed as skipped")
    infer.add_argument("--batch-sizes", type=parse_sizes, default=BATCH_SIZES, metavar="N,N", help="for the config's model")
    infer.add_argument("--model-batch-sizes", type=parse_sizes, default=None, metavar="N,N",
                       help=f"for --model; default {','.join(map(str, MODEL_BATCH_SIZES_CPU))} on a CPU, --batch-sizes on a GPU")
    infer.add_argument("--warmup", type=int, default=10, metavar="N", help="warm-up runs before timing")
    infer.add_argument("--min-iters", type=int, default=50, metavar="N", help="at least N timed runs per model, backend and batch size")
    infer.add_argument("--min-seconds", type=float, default=1.0, metavar="S", help="and at least S seconds of timing")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch.set_num_threads(N) first; default: PyTorch's")
    args = parser.parse_args(argv)
    if min(args.limit_batches, args.chunk, args.min_iters, args.random_images) < 1 or min(args.epochs, args.warmup, args.memory_steps) < 0:
        parser.error("--limit-batches, --chunk, --min-iters and --random-images must be >= 1; --epochs, --warmup and --memory-steps >= 0")
    return args


def batch_sizes(subject: Subject, args: argparse.Namespace) -> tuple[int, ...]:
    if subject.shape is None:
        return args.batch_sizes
    return args.model_batch_sizes or (args.batch_sizes if torch.cuda.is_available() else MODEL_BATCH_SIZES_CPU)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = tuple(args.set)
    subjects = [Subject(args.config, overrides)]
    subjects += [Subject(args.config, overrides, name, args.width, args.data_shape, args.random_images) for name in args.model]
    variants = [(), *(tuple(shlex.split(c)) for c in args.compare)]
    try:
        training = [measure_training(s, variants, args) for s in subjects] if args.only != "inference" else []
        inference = []
        if args.only != "training":
            with RichReporter(progress) as reporter:
                inference = [measure_inference(s, batch_sizes(s, args), args, reporter) for s in subjects]
    except RapcError as exc:
        sys.exit(f"error: {exc}")
    figures = {"machine": machine(), "load_average": {"start": load_start, "end": os.getloadavg()[0]},
               "training": training, "inference": inference, "total_seconds": time.perf_counter() - started}
    print_results(figures, Console(width=None if sys.stdout.isatty() else 200))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
