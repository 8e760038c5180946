"""What ``pruning.round_to`` does to latency on onnxruntime CPU, at one MAC budget, measured in one run.

For each model shape -- the default preset's LeNet w=16 on 28x28 MNIST images, and with
``--resnet-width W`` a CIFAR-style ResNet-18 on 3x32x32 (off by default: its allocations take
about six minutes on 2 cores, where LeNet's take seconds) -- and each ``round_to`` of
``--round-to``, the dense architecture is allocated to ``--macs`` of its dense MACs by rapc's
uniform allocator (``pruning.target``), hard pruned by the projector and physically shrunk by
torch-pruning, as ``rapc compress --target macs=F --set pruning.round_to=N`` does. The weights are
randomly initialised, not trained: latency depends on the widths (what the budget and the
rounding decide), not on which channels were kept or on their values.

Each shrunk model and the dense one are exported by rapc's exporter and timed in rapc's
``OnnxRuntimeRunner`` (what ``rapc bench``'s ort-cpu backend runs, with ``--threads`` threads) at
each batch size of ``--batch-sizes``, all of a shape's models interleaved (every round runs each
once: ``rapc.bench.latency.measure``), ``--repeats`` times. Printed per model and batch: the kept
widths, the MACs kept, the median of the repeats' p50 latencies, and two ratios computed per
repeat (median, then min-max over the repeats): round_to=1's latency over this model's (above
1: the rounding is faster) and the dense model's over this model's.

    .venv/bin/python benchmarks/round_to_latency.py
    .venv/bin/python benchmarks/round_to_latency.py --resnet-width 4 --repeats 5

Measured figures, with the command, machine and date: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rapc.bench.latency import Opened, TimingPolicy, measure
from rapc.bench.run import machine
from rapc.config import PruningConfig, ShrinkConfig, TargetConfig
from rapc.export.onnx import export_onnx
from rapc.export.runners import OnnxRuntimeRunner
from rapc.measure import macs_and_params
from rapc.models import create_model
from rapc.pipeline.allocation import allocate, metric_cost
from rapc.pipeline.masks import hard_prune
from rapc.pipeline.projection import Projector
from rapc.pipeline.shrink import shrink


@dataclass
class Variant:
    name: str  # "dense" or "round_to=N"
    model: nn.Module
    macs: int
    widths: str  # kept/channels per channel group, in model order
    met: bool  # the allocation met the budget within its tolerance


def _dense(shape: str, resnet_width: int) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if shape == "lenet":  # the default preset's architecture: mnist5k's 28x28 digits, LeNet w=16
        return create_model("lenet", num_classes=10, in_channels=1, image_size=28, width=16, mean=[0.1307], std=[0.3081]).eval(), (1, 28, 28)
    return create_model("resnet18", num_classes=10, in_channels=3, image_size=32, width=resnet_width,
                        mean=[0.5] * 3, std=[0.25] * 3).eval(), (3, 32, 32)


def variants(dense: nn.Module, input_shape: tuple[int, ...], fraction: float, round_tos: list[int]) -> list[Variant]:
    """The dense model and, per round_to, the model rapc's pipeline shrinks to ``fraction`` of its MACs."""
    example = torch.rand(2, *input_shape)
    dense_macs = macs_and_params(dense, example)[0]
    out = [Variant("dense", dense, dense_macs, "-", True)]
    for n in round_tos:
        pruning = PruningConfig(scheme="filter", target=TargetConfig(macs=fraction), allocation="uniform", round_to=n)
        allocation = allocate(dense, example, pruning, ShrinkConfig(), metric_cost("macs", example))
        model = copy.deepcopy(dense)
        hard_prune(model, Projector(model, example, allocation.apply(pruning)))
        shrunk = shrink(model, example, ShrinkConfig()).model
        widths = " ".join(f"{u.kept}/{u.channels}" for u in allocation.units if u.channels)
        out.append(Variant(f"round_to={n}", shrunk, macs_and_params(shrunk, example)[0], widths, allocation.met))
    return out


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def bench_shape(shape: str, args: argparse.Namespace, folder: Path) -> dict:
    dense, input_shape = _dense(shape, args.resnet_width)
    found = variants(dense, input_shape, args.macs, args.round_to)
    opened = {}
    for v in found:
        path = export_onnx(v.model, list(input_shape), folder / f"{shape}-{v.name}.onnx")
        opened[("ort-cpu", v.name)] = Opened(OnnxRuntimeRunner(path, threads=args.threads), input_shape)
    policy = TimingPolicy(warmup=args.warmup, min_iters=args.min_iters, min_seconds=args.min_seconds)
    label = "LeNet w=16, 1x28x28" if shape == "lenet" else f"ResNet-18 w={args.resnet_width}, 3x32x32"
    print(f"\n{label}: {found[0].macs / 1e6:.2f} MMACs dense, budget {args.macs:g} of them; "
          f"onnxruntime CPU, {args.threads} threads, {args.repeats} repeats interleaved")
    rows = []
    for batch in args.batch_sizes:
        p50: dict[str, list[float]] = {v.name: [] for v in found}
        for _ in range(args.repeats):
            for result in measure(opened, batch, policy):
                p50[result.artifact].append(result.p50_ms)
        base = f"round_to={args.round_to[0]}"
        wide = max(len("kept/channels per group"), *(len(v.widths) for v in found))
        print(f"batch {batch}")
        print(f"  {'model':<12} {'kept/channels per group':<{wide}} {'MACs kept':>9} {'p50 ms':>8}   "
              f"{f'{base} / this':<22} dense / this")
        for v in found:
            over_base = [b / t for b, t in zip(p50[base], p50[v.name])]
            over_dense = [d / t for d, t in zip(p50["dense"], p50[v.name])]
            note = "" if v.met else "  (budget not met within 2%)"
            print(f"  {v.name:<12} {v.widths:<{wide}} {v.macs / found[0].macs:>9.3f} {statistics.median(p50[v.name]):>8.3f}   "
                  f"{_spread(over_base):<22} {_spread(over_dense)}{note}")
            rows.append({"shape": shape, "batch": batch, "model": v.name, "widths": v.widths, "macs": v.macs,
                         "mac_fraction": v.macs / found[0].macs, "budget_met": v.met, "p50_ms": p50[v.name],
                         "vs_first_round_to": over_base, "vs_dense": over_dense})
    return {"shape": label, "rows": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    parser.add_argument("--round-to", type=ints, default=[1, 4, 8, 16], help="round_to values, the first the reference (default 1,4,8,16)")
    parser.add_argument("--macs", type=float, default=0.26, help="MAC budget, the fraction of the dense MACs kept (default 0.26: "
                        "the default preset's compressed LeNet, 3.8x fewer MACs)")
    parser.add_argument("--batch-sizes", type=ints, default=[1, 64])
    parser.add_argument("--resnet-width", type=int, default=0, help="width of a second shape, a CIFAR ResNet-18 (4: 16..128 "
                        "channels); 0 (the default) leaves it out")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="onnxruntime intra-op threads (default: "
                        "torch's, as rapc bench)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--min-iters", type=int, default=100)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    started, load = time.perf_counter(), os.getloadavg()[0]
    print(f"{info['platform']}, {info['cpu_count']} CPUs, onnxruntime {info['versions'].get('onnxruntime')}, torch "
          f"{info['versions'].get('torch')}, torch-pruning {info['versions'].get('torch-pruning')}; load average {load:.2f}")
    print("random weights: latency depends on the widths the budget and round_to give, not on the weights")
    shapes = ["lenet"] + (["resnet18"] if args.resnet_width else [])
    with tempfile.TemporaryDirectory(prefix="rapc-round-to-") as folder:
        results = [bench_shape(shape, args, Path(folder)) for shape in shapes]
    end = os.getloadavg()[0]
    print(f"\nload average {load:.2f} at start, {end:.2f} at end; {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "load_average": {"start": load, "end": end}, "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
