"""How fast rapc trains and how much memory it takes, and how much faster its shrunk models run
on every inference backend, measured in one run.

What is measured ("subjects"): the config's model on its dataset (default: the preset
``mnist-lenet-filter``, LeNet w=16 on mnist5k, batch 64), and with ``--model NAME`` a registry
model on random images of ``--data-shape`` (e.g. a CIFAR-sized ResNet-18), trained and pruned
with the same config otherwise.

1. Training, with the library's own loop (``rapc.pipeline.loop.train_epoch``) and the module
   that compress() trains (``training_module``: the config's channels_last, compile and
   cudnn_benchmark applied), per mode: clean (reference), PGD-k as the config's
   ``attack.train`` sets it, FGSM-RS (``method=fgsm``), and each attack with the ADMM proximal
   penalty (the admm stage's optimizer; the once-per-epoch Z/U update timed apart and added).
   All modes, each on its own model and loader, are timed interleaved: every round trains
   each for ``--chunk`` batches (one train_epoch call over them: the loop reads its device-side
   sums back once per call, as it does about ten times per epoch in compress()). Seconds per
   epoch = train images / measured images/s (+ the Z/U update); ``--epochs N`` times whole
   epochs instead. compress()'s per-epoch validation and checkpoints are not part of it.
   ``--compare "KEY=VALUE ..."`` adds config variants timed in the same rounds, so a before/after
   ratio comes from one run (``data.workers=2``; on a GPU ``precision=bf16 channels_last=true``).
2. Peak memory per mode and variant, each in a fresh process (spawned, so no other mode's
   allocations or freed-but-kept heap count), over ``--memory-steps`` training steps (2: the
   optimizer's state exists from the first step on). On CUDA: ``torch.cuda.max_memory_allocated``
   after ``reset_peak_memory_stats`` (tensors, not the allocator's cache or the CUDA context).
   On CPU (Linux): the process's peak resident set (VmHWM), reset to the current RSS through
   ``/proc/self/clear_refs`` after ``malloc_trim`` returned freed heap, so "peak" is the highest
   RSS during the steps and "+MiB" what the steps added to what the process held before them
   (model, data, libraries); DataLoader worker processes are not counted.
3. Inference, dense vs shrunk: a model with the config's architecture (random weights: latency
   does not depend on them) hard pruned with the Projector's masks and physically shrunk with
   ``rapc.pipeline.shrink.shrink``, as compress() does; both exported to ONNX with rapc's
   exporter into a temporary folder (and built into TensorRT engines where TensorRT and a GPU
   are present), then timed on every ``rapc bench`` backend that can run here, per batch size,
   with ``rapc.bench.latency.measure_backends`` (dense and shrunk interleaved per backend):
   latency, images/s, and the speedup beside the MAC and parameter ratios.

Run from the repository root (everything is printed; ``--json`` also writes it):

    .venv/bin/python benchmarks/compress_speed.py
    .venv/bin/python benchmarks/compress_speed.py --model resnet18 --data-shape 3,32,32 --json speed.json
    .venv/bin/python benchmarks/compress_speed.py --compare data.workers=2          # DataLoader workers before/after
    .venv/bin/python benchmarks/compress_speed.py --compare "precision=bf16 channels_last=true"   # on a GPU
    .venv/bin/python benchmarks/compress_speed.py --only training --epochs 1       # whole epochs, no extrapolation

Measured on a 2-core x86_64 CPU machine (torch 2.14.1, no GPU) that other jobs kept busy (1-min
load average 2.3-5 on its 2 cores): every figure is noisy and slower than on an idle machine.
All runs used ``--threads 1``: with PyTorch's two threads competing with those processes for
the cores, a PGD-5 batch took 2.5 s instead of 0.4 s. Shortened runs:

    .venv/bin/python benchmarks/compress_speed.py --model resnet18 --data-shape 3,32,32 --threads 1 \
        --limit-batches 2 --chunk 1 --backends torch-eager,ort-cpu --min-iters 10 --min-seconds 0.5 --warmup 2

    training, batch 64          LeNet w=16, mnist5k (57 batches)     ResNet-18 w=16, random 3x32x32 (704)
    mode                        ms/batch  img/s  s/epoch  peak/+MiB   ms/batch  img/s  s/epoch  peak/+MiB
    clean (reference)               78     819     4.4    828/125       2429     26     1708   1918/670
    PGD-5 (eps 0.3)                393     163    22.1    823/119      10189      6     7164   1945/697
    ADMM + PGD-5                   411     156    23.2    872/128      10017      6     7043   2119/768
    FGSM-RS                        163     392     9.2    826/122       4121     16     2898   2002/754
    ADMM + FGSM-RS                 167     384     9.4    879/136       4034     16     2837   2088/737

    dense vs shrunk, speedup of the mean latency (MAC ratio: LeNet 3.81x, ResNet-18 3.98x)
    batch                           1      8     64    256        1      8     32
    LeNet      torch-eager       2.13x  2.49x  2.79x  2.45x
               ort-cpu           3.67x  3.69x  3.90x  3.52x
    ResNet-18  torch-eager                                     2.56x  3.35x  3.58x
               ort-cpu                                         3.79x  4.17x  4.11x

Each ms/batch above is the mean of 2 timed batches (ResNet-18's ADMM rows below its plain
ones are that noise; a LeNet run with ``--limit-batches 20 --chunk 5`` under heavier load gave
PGD-5 473 ms, ADMM + PGD-5 490 ms). That run, with every CPU backend, LeNet only
(``--limit-batches 20 --chunk 5 --threads 1 --min-iters 20 --min-seconds 0.5 --warmup 3``): torch-compiled 2.11x / 2.34x / 2.87x / 3.16x
at batch 1 / 8 / 64 / 256, torch-eager 2.14x / 2.26x / 2.42x / 2.72x, ort-cpu 3.63x / 3.42x /
3.76x / 3.90x.

Before/after, same machine and load, ``--only training --modes clean,pgd --memory-steps 0
--limit-batches 30 --chunk 5 --threads 1``:

- pgd() with one fused clamp (this change) vs two clamps (rapc/attacks.py before it), run
  alternately twice with the library before and after on PYTHONPATH: the PGD-5 epoch of LeNet
  took 22.30 / 21.51 s before and 21.35 / 21.17 s after, PGD/clean 4.92-4.94x before and
  4.96-4.98x after: within noise, as convolutions dominate the step. pgd() alone, timed by a
  throwaway script (30 calls each, old and new interleaved, one thread): LeNet w=16 at batch 64, PGD-5, 348 ms before, 347 ms after;
  a linear model on 3x32x32 at batch 256, where the attack's own arithmetic dominates, 30.7 ms
  before and 19.0 ms after (0.59x).
- ``--compare data.workers=2``: 0.97x the images/s of workers=0 for clean and 0.99x for PGD-5
  (0.94x and 0.88x with two threads, under heavier load): on 2 cores with mnist5k in memory,
  worker processes only add inter-process copies; they help where loading decodes or augments.

channels_last and bf16 are GPU switches: they were not measured here (no GPU); compare them
with ``--compare "precision=bf16 channels_last=true"`` on one. ``cudnn_benchmark`` is
process-wide: compare it in two runs (``--set cudnn_benchmark=true``), not with ``--compare``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from rapc.bench.backends import BACKENDS, Artifact
from rapc.bench.latency import TimingPolicy, build_backends, measure_backends
from rapc.bench.report import skipped_lines
from rapc.bench.run import machine, speedups
from rapc.config import DEFAULT_PRESET, Config, StageConfig, TrainAttackConfig, load_config
from rapc.data import Splits, load_data, loader, random_splits
from rapc.errors import RapcError
from rapc.export.onnx import export_onnx
from rapc.export.tensorrt import EngineSpec, build_engine, cannot_run_engines
from rapc.models import MODELS
from rapc.pipeline.admm import AdmmState
from rapc.pipeline.compress import architecture_for, hard_prune, resolve_device, seed_everything
from rapc.pipeline.distributed import Ranks
from rapc.pipeline.loop import Hooks, make_optimizer, make_schedule, train_epoch
from rapc.pipeline.measure import summary
from rapc.pipeline.projection import Projector
from rapc.pipeline.shrink import shrink
from rapc.pipeline.speed import training_module
from rapc.progress import RichReporter
from rapc.tables import Table

MODES = ("clean", "pgd", "admm-pgd", "fgsm", "admm-fgsm")
BATCH_SIZES = (1, 8, 64, 256)
MODEL_BATCH_SIZES_CPU = (1, 8, 32)  # --model on a CPU: a ResNet-18 at 256 images takes seconds per call
RANDOM_IMAGES = 45_000  # CIFAR-10's 50,000 training images less rapc's 10% validation split
EXAMPLE_IMAGES = 64  # for the Projector, the shrink's output check and MAC counts, as in compress()
MIB = 2**20
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


def time_calls(calls: Mapping[str, Callable[[], object]], timing: Timing) -> dict[str, list[float]]:
    """Call each function in turn (interleaved): ``warmup`` rounds, then timed rounds until
    at least ``min_iters`` rounds and ``min_seconds`` of wall time; seconds per call.

    The calls must finish their work before returning (train_epoch reads its sums back, a
    device sync), so perf_counter around a call measures the call.
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
    return samples


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


def example_batch(splits: Splits, device: torch.device) -> torch.Tensor:
    return next(iter(loader(splits.val, EXAMPLE_IMAGES, shuffle=False)))[0].to(device)


# --- 1. training speed -------------------------------------------------------------------


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


def _admm_hooks(cfg: Config, model: nn.Module, example: torch.Tensor) -> tuple[Hooks, Callable[[], object]]:
    """compress()'s ADMM wiring for update_unit=epoch: the penalty every step, the Z/U update and
    residuals at the end of the epoch."""
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


def _mode_setup(cfg: Config, key: str) -> tuple[str, StageConfig, TrainAttackConfig | None]:
    """A mode's name, the stage whose optimizer it uses and its attack."""
    attacks = {"clean": None, "pgd": cfg.attack.train, "fgsm": cfg.attack.train.model_copy(update={"method": "fgsm"})}
    attack = attacks[key.removeprefix("admm-")]
    name = "clean (reference)" if attack is None else _attack_name(attack)
    if key.startswith("admm-"):
        return f"ADMM + {name}", cfg.stages.admm, attack
    return name, cfg.stages.pretrain, attack


def build_mode(key: str, cfg: Config, splits: Splits, device: torch.device, chunk: int | None) -> TrainMode:
    """One mode on its own freshly built model and loader, set up as compress()'s Trainer.stage sets
    up a stage; each call trains ``chunk`` batches (None: a whole epoch)."""
    name, stage, attack = _mode_setup(cfg, key)
    model = architecture_for(cfg, splits).build().to(device)
    data = loader(splits.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.data.workers, pin=device.type == "cuda")
    hooks, epoch_end = _admm_hooks(cfg, model, example_batch(splits, device)) if key.startswith("admm-") else (Hooks(), None)
    module = training_module(model, cfg, device, Ranks())
    optimizer = make_optimizer(model.parameters(), stage.optimizer)
    schedule = make_schedule(optimizer, stage.schedule, len(data), stage.epochs)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    batches = _cycle(data)

    def call() -> dict[str, float]:
        # an unsized slice: train_epoch reads its sums back at its end only (and every 20 steps)
        source = data if chunk is None else islice(batches, chunk)
        return train_epoch(module, source, optimizer, schedule, attack=attack, device=device,
                           precision=cfg.precision, scaler=scaler, hooks=hooks)

    if chunk is None:
        return TrainMode(name, call, len(data), len(splits.train), epoch_end)  # type: ignore[arg-type]
    return TrainMode(name, call, chunk, chunk * cfg.data.batch_size, epoch_end)


def _release_free_heap() -> None:
    """Give the heap that glibc keeps after frees back to the OS, so RSS counts live memory only."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RapcError(f"/proc/self/status has no {field}: peak memory on CPU needs Linux")


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensors; not the allocator cache or context)"
    return ("CPU: peak resident set (VmHWM) of a fresh process, reset via /proc/self/clear_refs after malloc_trim; "
            "+MiB = peak - RSS before the first step; DataLoader workers not counted")


def peak_memory(subject: Subject, variant: tuple[str, ...], key: str, steps: int, threads: int | None) -> dict[str, float]:
    """Run in a fresh process: ``steps`` training steps of one mode (and ADMM's epoch-end update);
    the peak memory over them and the memory held before them, in MiB."""
    if threads:
        torch.set_num_threads(threads)
    cfg = subject.config_with(variant)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    mode = build_mode(key, cfg, subject.splits(cfg), device, chunk=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        _release_free_heap()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_bytes("VmRSS")
    for _ in range(steps):
        mode.call()
    if mode.epoch_end is not None:
        mode.epoch_end()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_bytes("VmHWM")
    return {"peak_mib": peak / MIB, "before_mib": before / MIB, "increment_mib": (peak - before) / MIB}


def in_fresh_process(function: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


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
    samples = time_calls({f"{variant_name(v)}|{k}": m.call for (v, k), m in modes.items()}, Timing(warmup=1, min_iters=calls, min_seconds=0.0))
    rows = []
    for (variant, key), mode in modes.items():
        seconds = samples[f"{variant_name(variant)}|{key}"]
        per_batch = Stats.of([s / mode.batches_per_call for s in seconds])
        end_ms = Stats.of(time_calls({"end": mode.epoch_end}, EPOCH_END_TIMING)["end"]).mean_ms if mode.epoch_end else 0.0
        images_per_s = mode.images_per_call / float(np.mean(seconds))
        row = {"variant": variant_name(variant), "key": key, "mode": mode.name, **asdict(per_batch), "batches_per_call": mode.batches_per_call,
               "images_per_s": images_per_s, "epoch_seconds": n_images / images_per_s + end_ms / 1e3, "epoch_end_ms": end_ms}
        if args.memory_steps:
            progress.print(f"peak memory: {mode.name} ({row['variant']}), {args.memory_steps} steps in a fresh process")
            row |= in_fresh_process(peak_memory, subject, variant, key, args.memory_steps, args.threads)
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
        "memory_method": memory_method(device) if args.memory_steps else None, "memory_steps": args.memory_steps, "rows": rows,
    }


# --- 2. dense vs shrunk inference ---------------------------------------------------------


def hard_prune_and_shrink(model: nn.Module, example: torch.Tensor, cfg: Config) -> tuple[nn.Module, nn.Module]:
    """(dense copy, shrunk model): compress()'s hard prune, then shrink()."""
    dense = copy.deepcopy(model).eval()
    hard_prune(model, Projector(model, example, cfg.pruning))
    return dense, shrink(model.eval(), example, cfg.shrink).model.eval()


def artifacts(models: Mapping[str, nn.Module], shape: tuple[int, ...], backends: list[str], max_batch: int, folder: Path) -> list[Artifact]:
    """The models, exported to ONNX when a requested backend runs ONNX or engines, and built into
    TensorRT engines when an engine backend is requested and can run here."""
    runs = {BACKENDS.get(name).runs for name in backends}
    engines = "engine" in runs and cannot_run_engines() is None
    found = []
    for name, model in models.items():
        onnx = export_onnx(model, list(shape), folder / f"{name}.onnx") if runs & {"onnx", "engine"} else None
        engine = build_engine(EngineSpec(onnx, shape, max_batch)).path if engines and onnx else None
        found.append(Artifact(name, model, shape, onnx=onnx, engine=engine))
    return found


def measure_inference(subject: Subject, batch_sizes: tuple[int, ...], args: argparse.Namespace, reporter: RichReporter) -> dict[str, Any]:
    cfg = subject.config_with()
    seed_everything(cfg.seed)
    splits = subject.splits(cfg)
    example = example_batch(splits, torch.device("cpu"))
    label = subject.label(cfg)
    progress.print(f"inference {label}: hard prune + shrink, export, then dense vs shrunk per backend at batch {', '.join(map(str, batch_sizes))}")
    dense, shrunk = hard_prune_and_shrink(architecture_for(cfg, splits).build(), example, cfg)
    models = {"dense": dense, "shrunk": shrunk}
    figures = {name: summary(model, example) for name, model in models.items()}
    timing = TimingPolicy(warmup=args.warmup, min_iters=args.min_iters, min_seconds=args.min_seconds)
    with tempfile.TemporaryDirectory() as folder:
        runnable, skipped = build_backends(args.backends, artifacts(models, tuple(example.shape[1:]), args.backends, max(batch_sizes), Path(folder)))
        latencies = measure_backends(runnable, batch_sizes, timing, reporter)
    if no_engines := cannot_run_engines():  # the engines were not built for that reason, not for want of `rapc export --trt`
        skipped |= {key: no_engines for key in skipped if BACKENDS.get(key.split(":")[0]).runs == "engine"}
    return {
        "subject": label, "models": figures, "timing": asdict(timing), "skipped": skipped,
        "latency": [l.as_dict() | {"noisy": l.cv > timing.cv_warning} for l in latencies],
        "speedup": speedups(latencies, figures, {"dense": "dense", "shrunk": "shrunk"}),
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
        s = speedup.get((l["backend"], l["batch"])) if l["artifact"] == "shrunk" else None
        ratios = (f"{s['speedup']:.2f}x", f"{s['mac_ratio']:.2f}x", f"{s['param_ratio']:.2f}x") if s else ("", "", "")
        rows.append((l["backend"], str(l["batch"]), l["artifact"], str(l["n"]), f"{l['mean_ms']:.3f}", f"{l['p50_ms']:.3f}", f"{l['p90_ms']:.3f}",
                     f"{l['images_per_s']:,.0f}", f"{l['cv']:.0%}" + (" !" if l["noisy"] else ""), *ratios))
    d, s = inference["models"]["dense"], inference["models"]["shrunk"]
    title = (f"Dense vs shrunk inference, {inference['subject']} ({d['params']:,} -> {s['params']:,} params, "
             f"{d['macs'] / 1e6:.2f} -> {s['macs'] / 1e6:.2f} MMACs); speedup = dense / shrunk mean latency, same backend, batch and run")
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
