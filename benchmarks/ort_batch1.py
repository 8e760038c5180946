"""Where onnxruntime CPU loses at batch 1: each session option, export choice and call path measured on the
dense and the compressed model, in one run, against the MAC ratio.

The models: the default preset's LeNet w=16 (1x28x28) and its compressed form, the same architecture
hard pruned by rapc's projector at the preset's filter ratio 0.5 and shrunk by torch-pruning (random
weights: latency depends on the widths, not on the values). Each variant changes one thing from
``before``, rapc's OnnxRuntimeRunner as it was when this benchmark was written: the torch.export-based
exporter at opset 18, ORT_ENABLE_ALL, sequential execution, ``--threads`` intra-op threads (torch's
count, as ``rapc bench``), spinning off, ``session.run`` with a dict of numpy arrays. ``rapc`` is the
runner as it is now (``rapc.export.runners.OnnxRuntimeRunner`` on ``rapc.export.onnx.export_onnx``'s
file); the graph rewrites (``relu_before_pool``, ``fold_div``) live here, as variants.

Each variant is timed in windows interleaved with ``before`` (``time_interleaved``: every round runs
before's dense and compressed sessions and the variant's once), ``--repeats`` windows per variant
(each repeat starting from another variant), at each batch of ``--batch-sizes``: an effect compares
timings of the same moments, so a shared machine's load moves both sides of the ratio alike. The
``control`` variant (the same as before, in sessions of its own) and ``opset-20`` (the same nodes)
show how far an effect strays by chance. Printed per batch: the median p50 latency of each model,
the speedup dense/compressed and its fraction of the MAC ratio, and each variant's effect on each
model (before's p50 over the variant's in the same window: median and min-max over the windows;
above 1 is faster). ``helps`` marks a median effect above 1.05 with every window above 1 on the
compressed model at batch 1: a mark, not a verdict (compare it with the controls, and across runs).
A spinning variant's idle threads also slow the before sessions it is interleaved with, which
inflates its effect.

    .venv/bin/python benchmarks/ort_batch1.py
    .venv/bin/python benchmarks/ort_batch1.py --repeats 5 --batch-sizes 1
    .venv/bin/python benchmarks/ort_batch1.py --profile

Measured figures, with the command, machine and date: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from rapc.bench.latency import TimingPolicy, TimingStats, time_interleaved
from rapc.bench.run import machine
from rapc.config import PruningConfig, ShrinkConfig
from rapc.export.onnx import INPUT, OUTPUT, export_onnx
from rapc.export.runners import OnnxRuntimeRunner
from rapc.measure import macs_and_params
from rapc.models import create_model
from rapc.pipeline.masks import hard_prune
from rapc.pipeline.projection import Projector
from rapc.pipeline.shrink import shrink

INPUT_SHAPE = (1, 28, 28)


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = create_model("lenet", num_classes=10, in_channels=1, image_size=28, width=16, mean=[0.1307], std=[0.3081]).eval()
    pruned = copy.deepcopy(dense)
    example = torch.rand(2, *INPUT_SHAPE)
    hard_prune(pruned, Projector(pruned, example, PruningConfig(scheme="filter", ratio=0.5)))
    return {"dense": dense, "compressed": shrink(pruned, example, ShrinkConfig()).model}


# --- the export variants: how the ONNX file is written -------------------------------------------


def export_before(model: nn.Module, path: Path) -> Path:
    """rapc's exporter as it was: torch.export-based, opset 18, the optimizer on; the graph as torch writes it."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    example = torch.rand(2, *INPUT_SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=18, verbose=False, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}},
                          external_data=False, optimize=True)
    return path


def export_opset(opset: int) -> Callable[[nn.Module, Path], Path]:
    def export(model: nn.Module, path: Path) -> Path:
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.rand(2, *INPUT_SHAPE),), str(path), dynamo=True, opset_version=opset, verbose=False,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}}, external_data=False, optimize=True)
        return path
    return export


def export_legacy(model: nn.Module, path: Path) -> Path:
    """The TorchScript exporter (opset 17): Flatten + Gemm, constants folded by it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, *INPUT_SHAPE),), str(path), dynamo=False, opset_version=17, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    return path


def relu_before_pool(graph: onnx.ModelProto) -> int:
    """Move every Relu that is a MaxPool's only reader before that MaxPool, in place; returns how many moved.
    relu(max(window)) = max(relu(window)) (both monotone; MaxPool's padding never wins a max), so the outputs are
    equal, and right after the Conv onnxruntime fuses the Relu into it: one node less per pool."""
    nodes = graph.graph.node
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    moved = 0
    for pool in list(nodes):
        if pool.op_type != "MaxPool" or len(pool.output) != 1 or len(readers.get(pool.output[0], [])) != 1:
            continue
        relu = readers[pool.output[0]][0]
        if relu.op_type != "Relu":
            continue
        pooled, result = pool.output[0], relu.output[0]
        relu.input[0], relu.output[0] = pool.input[0], f"{pool.input[0]}_relu"
        pool.input[0], pool.output[0] = relu.output[0], result
        nodes.remove(relu)
        nodes.insert(list(nodes).index(pool), relu)  # topological order: the Relu now runs first
        for value in [v for v in graph.graph.value_info if v.name == pooled]:  # the tensor between them is gone
            graph.graph.value_info.remove(value)
        moved += 1
    return moved


def fold_div(graph: onnx.ModelProto) -> int:
    """Fold a Div by a constant per-channel tensor (the model's input normalization) into the Conv that alone reads it,
    in place: conv(x / s) = conv'(x) with conv's weights divided by s per input channel, exact with zero padding
    (0 / s = 0). The Sub before it cannot be folded so: a padded zero is not a shifted zero. Returns how many were folded."""
    from onnx import numpy_helper

    nodes, inits = graph.graph.node, {i.name: i for i in graph.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    folded = 0
    for div in list(nodes):
        if div.op_type != "Div" or div.input[1] not in inits or len(readers.get(div.output[0], [])) != 1:
            continue
        conv = readers[div.output[0]][0]
        if conv.op_type != "Conv" or conv.input[0] != div.output[0] or conv.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[div.input[1]]).reshape(1, -1, 1, 1)
        weight = numpy_helper.to_array(inits[conv.input[1]])
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array((weight / scale).astype(weight.dtype), conv.input[1]))
        conv.input[0] = div.input[0]
        nodes.remove(div)
        folded += 1
    return folded


def export_rewritten(*rewrites: Callable[[onnx.ModelProto], int]) -> Callable[[nn.Module, Path], Path]:
    def export(model: nn.Module, path: Path) -> Path:
        export_before(model, path)
        graph = onnx.load(str(path))
        for rewrite in rewrites:
            rewrite(graph)
        onnx.save(graph, str(path))
        return path
    return export


def export_rapc(model: nn.Module, path: Path) -> Path:
    return export_onnx(model, list(INPUT_SHAPE), path)


# --- the session variants: how the file is run ----------------------------------------------------


@dataclass
class Variant:
    name: str
    what: str  # the one thing it changes
    export: Callable[[nn.Module, Path], Path] = export_before
    threads: int | None = None  # None: --threads
    spinning: bool = False
    level: str = "ORT_ENABLE_ALL"
    parallel: bool = False
    config: dict[str, str] = field(default_factory=dict)
    binding: bool = False  # run_with_iobinding with the output bound to a preallocated array
    rapc: bool = False  # rapc's OnnxRuntimeRunner as it is now, on rapc's exporter


VARIANTS = [
    Variant("before", "rapc's runner and exporter when this benchmark was written"),
    Variant("control", "the same as before, in sessions of its own: the noise floor of an effect"),
    Variant("spinning", "session.intra_op.allow_spinning=1 (onnxruntime's default)", spinning=True),
    Variant("threads=1", "one intra-op thread", threads=1),
    Variant("extended", "ORT_ENABLE_EXTENDED: no NCHWc layout transform", level="ORT_ENABLE_EXTENDED"),
    Variant("basic", "ORT_ENABLE_BASIC: constant folding and redundant nodes only", level="ORT_ENABLE_BASIC"),
    Variant("parallel", "ORT_PARALLEL execution mode, 2 inter-op threads", parallel=True),
    Variant("no-prepack", "session.disable_prepacking=1", config={"session.disable_prepacking": "1"}),
    Variant("iobinding", "run_with_iobinding, output bound to a preallocated array", binding=True),
    Variant("opset-20", "the same exporter at opset 20 (the same nodes: a second noise control)", export=export_opset(20)),
    Variant("legacy-export", "TorchScript exporter, opset 17 (Flatten + Gemm)", export=export_legacy),
    Variant("relu-first", "Relu moved before MaxPool in the graph: Conv+Relu fused", export=export_rewritten(relu_before_pool)),
    Variant("fold-div", "the normalization's Div folded into conv1's weights", export=export_rewritten(fold_div)),
    Variant("lean-graph", "relu-first and fold-div", export=export_rewritten(relu_before_pool, fold_div)),
    Variant("lean", "lean-graph and iobinding", export=export_rewritten(relu_before_pool, fold_div), binding=True),
    Variant("rapc", "rapc's OnnxRuntimeRunner and export_onnx as they are now", rapc=True),
]


class Session:
    """One model's session under one variant: ``prepare`` a batch, then ``run``."""

    def __init__(self, path: Path, variant: Variant, threads: int) -> None:
        self.variant = variant
        if variant.rapc:
            self.runner = OnnxRuntimeRunner(path, threads=threads)
            self.session = self.runner.session
            return
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = variant.threads or threads
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, variant.level)
        if variant.parallel:
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            options.inter_op_num_threads = 2
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if variant.spinning else "0")
        for key, value in variant.config.items():
            options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def prepare(self, images: np.ndarray) -> None:
        if self.variant.rapc:
            self.runner.prepare(images)
            self.run = self.runner.run
            return
        feed = {INPUT: images}
        if self.variant.binding:
            binding = self.session.io_binding()
            binding.bind_cpu_input(INPUT, images)
            output = ort.OrtValue.ortvalue_from_shape_and_type([len(images), 10], np.float32, "cpu")
            binding.bind_ortvalue_output(OUTPUT, output)
            self.run = lambda: self.session.run_with_iobinding(binding)
        else:
            self.run = lambda: self.session.run(None, feed)

    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT: images})[0]


def _sessions(chosen: list[Variant], built: dict[str, nn.Module], folder: Path, threads: int) -> dict[str, dict[str, Session]]:
    """Per variant, a session of each model, each checked to compute what the PyTorch model does."""
    sessions: dict[str, dict[str, Session]] = {}
    check = np.random.rand(3, *INPUT_SHAPE).astype(np.float32)
    for v in chosen:
        sessions[v.name] = {}
        for name, model in built.items():
            path = (export_rapc if v.rapc else v.export)(model, folder / f"{v.name}-{name}.onnx")
            sessions[v.name][name] = session = Session(path, v, threads)
            with torch.no_grad():
                np.testing.assert_allclose(session.infer(check), model(torch.from_numpy(check)).numpy(), atol=1e-4, rtol=1e-4)
    return sessions


def profile(built: dict[str, nn.Module], folder: Path, threads: int, runs: int = 500) -> None:
    """Where before's batch-1 call goes, by onnxruntime's own profiler: per node of the optimized graph the
    median kernel time, their sum, the median of the whole run inside onnxruntime, and the median wall
    time of a Python session.run. Profiling adds its own cost to every node: read the split, not the totals."""
    images = {INPUT: np.random.rand(1, *INPUT_SHAPE).astype(np.float32)}
    for name, model in built.items():
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / f"profile-{name}")
        session = ort.InferenceSession(str(export_before(model, folder / f"profile-{name}.onnx")), options,
                                       providers=["CPUExecutionProvider"])
        for _ in range(100):
            session.run(None, images)
        wall = []
        for _ in range(runs):
            begin = time.perf_counter()
            session.run(None, images)
            wall.append(time.perf_counter() - begin)
        events = json.loads(Path(session.end_profiling()).read_text())
        whole = [e["dur"] for e in events if e.get("name") == "model_run"][-runs:]
        nodes: dict[str, list[float]] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                nodes.setdefault(f"{e['args']['op_name']} {e['name'].removesuffix('_kernel_time')}", []).append(e["dur"])
        per_node = {node: statistics.median(times[-runs:]) for node, times in nodes.items()}
        print(f"\n{name}, batch 1, profiled ({runs} runs, us, medians):")
        for node, us in per_node.items():
            print(f"  {node:<48} {us:7.1f}")
        print(f"  {'sum of the nodes':<48} {sum(per_node.values()):7.1f}\n  {'the run inside onnxruntime':<48} "
              f"{statistics.median(whole):7.1f}\n  {'session.run, wall':<48} {statistics.median(wall) * 1e6:7.1f}")


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    started, load = time.perf_counter(), os.getloadavg()[0]
    print(f"{info['platform']}, {info['cpu_count']} CPUs, onnxruntime {info['versions'].get('onnxruntime')}, torch "
          f"{info['versions'].get('torch')}; {args.threads} threads unless the variant says; load average {load:.2f}")
    built = models()
    example = torch.rand(2, *INPUT_SHAPE)
    macs = {name: macs_and_params(m, example)[0] for name, m in built.items()}
    mac_ratio = macs["dense"] / macs["compressed"]
    print(f"LeNet w=16 dense {macs['dense'] / 1e6:.2f} MMACs, compressed {macs['compressed'] / 1e6:.2f} (MAC ratio {mac_ratio:.2f}x); "
          f"random weights")
    chosen = [v for v in VARIANTS if not args.variants or v.name in args.variants or v.name == "before"]
    with tempfile.TemporaryDirectory(prefix="rapc-ort-batch1-") as folder:  # sessions hold what they need once built
        if args.profile:
            profile(built, Path(folder), args.threads)
            return 0
        sessions = _sessions(chosen, built, Path(folder), args.threads)
    policy = TimingPolicy(warmup=args.warmup, min_iters=args.min_iters, min_seconds=args.min_seconds)
    results = []
    for batch in args.batch_sizes:
        images = np.random.rand(batch, *INPUT_SHAPE).astype(np.float32)
        # Each variant is timed in windows of its own, interleaved with before (every round runs before's two
        # sessions and the variant's two once): an effect compares timings of the same moments, so the load
        # of a shared machine moves both sides of its ratio alike.
        p50: dict[str, dict[str, list[float]]] = {v.name: {"dense": [], "compressed": []} for v in chosen}
        paired: dict[str, dict[str, list[float]]] = {v.name: {"dense": [], "compressed": []} for v in chosen}  # before's, per window
        others = [v for v in chosen if v.name != "before"] or [chosen[0]]
        for repeat in range(args.repeats):
            for v in others[repeat % len(others):] + others[:repeat % len(others)]:  # each repeat starts elsewhere
                pair = {("before", m): s for m, s in sessions["before"].items()} | {(v.name, m): s for m, s in sessions[v.name].items()}
                for s in pair.values():
                    s.prepare(images)
                samples = time_interleaved({key: s.run for key, s in pair.items()}, policy)
                for (name, model), seconds in samples.items():
                    (paired[v.name] if name == "before" and v.name != "before" else p50[name])[model].append(TimingStats.of(seconds).p50_ms)
                time.sleep(args.pause)  # a spinning pool's threads stop before the next window
        for v in others:
            if v.name != "before":
                p50["before"]["dense"] += paired[v.name]["dense"]
                p50["before"]["compressed"] += paired[v.name]["compressed"]
        print(f"\nbatch {batch}: p50 ms (median over windows); speedup = dense / compressed p50; effect = before's p50 / this "
              f"variant's, in the same window ({args.repeats} windows: median (min-max))")
        print(f"  {'variant':<14} {'dense':>8} {'compr.':>8}  {'speedup':<20} {'of MACs':>7}  {'effect dense':<20} "
              f"{'effect compr.':<20}  what")
        for v in chosen:
            d, c = p50[v.name]["dense"], p50[v.name]["compressed"]
            speedup = [a / b for a, b in zip(d, c)]
            base = paired[v.name] if v.name != "before" else p50["before"]
            on_dense = [a / b for a, b in zip(base["dense"], d)]
            on_comp = [a / b for a, b in zip(base["compressed"], c)]
            helps = batch == 1 and v.name != "before" and statistics.median(on_comp) > 1.05 and min(on_comp) > 1.0
            print(f"  {v.name:<14} {statistics.median(d):>8.3f} {statistics.median(c):>8.3f}  {_spread(speedup):<20} "
                  f"{statistics.median(speedup) / mac_ratio:>7.2f}  {_spread(on_dense):<20} {_spread(on_comp):<20}  "
                  f"{'helps: ' if helps else ''}{v.what}")
            results.append({"variant": v.name, "what": v.what, "batch": batch, "p50_dense_ms": d, "p50_compressed_ms": c,
                            "speedup": speedup, "of_mac_ratio": statistics.median(speedup) / mac_ratio,
                            "effect_dense": on_dense, "effect_compressed": on_comp})
    end = os.getloadavg()[0]
    print(f"\nload average {load:.2f} at start, {end:.2f} at end; {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "load_average": {"start": load, "end": end}, "mac_ratio": mac_ratio,
                                         "results": results}, indent=1))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    parser.add_argument("--batch-sizes", type=ints, default=[1, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads of every variant that "
                        "does not set its own (default: torch's, as rapc bench)")
    parser.add_argument("--variants", type=lambda t: t.split(","), default=None,
                        help=f"a subset of: {', '.join(v.name for v in VARIANTS)} (before is always measured)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--min-iters", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between variants")
    parser.add_argument("--profile", action="store_true", help="instead: where before's batch-1 call goes, per node, by "
                        "onnxruntime's profiler")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
