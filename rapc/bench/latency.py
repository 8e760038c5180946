"""Latency the way trtexec and MLPerf measure it: warm up, then time until both a minimum
count and a minimum time are reached; report percentiles, throughput and spread.

Backends measured together are interleaved (every round runs each once), so a ratio
between them (dense vs compressed) comes from one run under the same conditions.
GPU backends are timed with CUDA events around a synchronized call, CPU ones with
perf_counter. Input transfer is timed separately from compute. The interleaved loop and
the statistics serve any repeated call, not only inference (the training benchmark
times training steps with them).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from rapc.bench.backends import BACKENDS, Artifact
from rapc.errors import RapcError
from rapc.export.onnx import export_onnx
from rapc.export.runners import Runner
from rapc.export.tensorrt import EngineSpec, build_engine, cannot_run_engines
from rapc.progress import Reporter

Key = TypeVar("Key", bound=Hashable)
Pair = tuple[str, str]  # (backend name, artifact name)
Timer = Callable[[Callable[[], object]], float]  # times one call, in seconds


@dataclass(frozen=True)
class TimingPolicy:
    warmup: int = 10
    min_iters: int = 50
    min_seconds: float = 1.0
    max_seconds: float = 60.0  # a cap per batch size, whatever min_iters asks
    cv_warning: float = 0.15  # coefficient of variation above which the figure is flagged


@dataclass(frozen=True)
class TimingStats:
    """Repeated timings of one call, in milliseconds: mean, percentiles and spread."""

    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cv: float  # std / mean of the per-call times

    @classmethod
    def of(cls, seconds: Sequence[float]) -> TimingStats:
        if not len(seconds):
            raise ValueError("no timings to summarize")
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        mean = float(ms.mean())
        return cls(len(ms), mean, float(p50), float(p90), float(p99), float(ms.std() / mean) if mean else 0.0)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class Latency(TimingStats):
    """The timing statistics of one backend on one artifact at one batch size."""

    backend: str
    artifact: str
    batch: int
    images_per_s: float
    transfer_ms: float | None  # host-to-device copy of the batch, GPU backends only


def wall_clock(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes by perf_counter: right for work that has finished when it returns."""
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def time_interleaved(calls: Mapping[Key, Callable[[], object]], policy: TimingPolicy,
                     timers: Mapping[Key, Timer] | None = None) -> dict[Key, list[float]]:
    """Seconds per call of every function, interleaved: each round calls each one once.

    ``policy.warmup`` untimed rounds, then timed rounds until at least ``min_iters`` rounds and
    ``min_seconds`` have passed, or ``max_seconds`` has. Every function thus runs under the same
    conditions (load, clocks, caches), so a ratio between two comes from one run. A call is
    timed by its timer in ``timers`` (default ``wall_clock``).
    """
    timers = timers or {}
    timed = {key: (call, timers.get(key, wall_clock)) for key, call in calls.items()}
    for _ in range(policy.warmup):
        for call in calls.values():
            call()
    samples: dict[Key, list[float]] = {key: [] for key in calls}
    if not calls:
        return samples
    rounds, started = 0, time.perf_counter()
    while True:
        for key, (call, timer) in timed.items():
            samples[key].append(timer(call))
        rounds += 1
        elapsed = time.perf_counter() - started
        if (rounds >= policy.min_iters and elapsed >= policy.min_seconds) or elapsed >= policy.max_seconds:
            return samples


@dataclass(frozen=True)
class Opened:
    """A backend's runner on one artifact: what latency times, and the image shape it is fed."""

    runner: Runner
    input_shape: tuple[int, ...]


def _timer(runner: Runner) -> Timer:
    """A function timing one call of ``fn`` in seconds on the runner's device."""
    if runner.device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def gpu(fn) -> float:
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return gpu

    return wall_clock


def _summary(name: str, artifact: str, batch: int, seconds: list[float], transfer: list[float]) -> Latency:
    stats = TimingStats.of(seconds)
    return Latency(backend=name, artifact=artifact, batch=batch, **stats.as_dict(), images_per_s=batch / (stats.mean_ms / 1e3),
                   transfer_ms=float(np.mean(transfer) * 1e3) if transfer else None)


def measure(opened: Mapping[Pair, Opened], batch: int, policy: TimingPolicy = TimingPolicy()) -> list[Latency]:
    """Time every (backend name, artifact name) -> runner at one batch size on random images, interleaved."""
    if batch < 1:
        raise RapcError(f"batch size must be at least 1, got {batch}")
    if not opened:
        return []
    for o in opened.values():
        o.runner.prepare(np.random.rand(batch, *o.input_shape).astype(np.float32))
    timers = {key: _timer(o.runner) for key, o in opened.items()}
    samples = time_interleaved({key: o.runner.run for key, o in opened.items()}, policy, timers)
    results = []
    for key, o in opened.items():
        transfer = [timers[key](o.runner.transfer) for _ in range(10)] if o.runner.device == "cuda" else []
        results.append(_summary(key[0], key[1], batch, samples[key], transfer))
    return results


def measure_backends(runnable: Mapping[Pair, Opened], batch_sizes: Sequence[int], policy: TimingPolicy,
                     reporter: Reporter) -> list[Latency]:
    """``measure`` per backend and batch size. The artifacts of one backend are interleaved (their
    ratio comes from one run); backends run one after another, since two runtimes' thread pools
    alternating on the same cores slow each other."""
    by_backend: dict[str, dict[Pair, Opened]] = {}
    for key, o in runnable.items():
        by_backend.setdefault(key[0], {})[key] = o
    results: list[Latency] = []
    reporter.begin("latency", len(batch_sizes) * len(by_backend))
    for batch in batch_sizes:
        for group in by_backend.values():
            results += measure(group, batch, policy)
            reporter.advance()
    reporter.end(f"latency: {len(runnable)} backend x artifact pairs at batch {', '.join(map(str, batch_sizes))}")
    return results


def build_backends(names: list[str], artifacts: list[Artifact]) -> tuple[dict[Pair, Opened], dict[str, str]]:
    """A runner of every backend that can run here for every artifact, and the skipped ones with their reason."""
    runnable: dict[Pair, Opened] = {}
    skipped: dict[str, str] = {}
    for name in names:
        cls = BACKENDS.get(name)
        for artifact in artifacts:
            reason = cls.skip_reason(artifact)
            if reason is not None:
                skipped[f"{name}:{artifact.name}"] = reason
            else:
                runnable[(name, artifact.name)] = Opened(cls.open(artifact), artifact.input_shape)
    return runnable, skipped


def backends_for_models(names: Sequence[str], models: Mapping[str, nn.Module], input_shape: tuple[int, ...], folder: Path,
                        max_batch: int) -> tuple[dict[Pair, Opened], dict[str, str]]:
    """``build_backends`` for models in memory, with no run directory or `rapc export` behind them.

    Each model (by artifact name) is exported to ONNX in ``folder`` when a requested backend runs
    ONNX files, and built there into a TensorRT engine for batches 1..``max_batch`` when an engine
    backend is requested and engines can run here; otherwise the engine backends are skipped with
    the reason engines cannot run, not with a pointer to `rapc export --trt`.
    """
    runs = {BACKENDS.get(name).runs for name in names}
    no_engines = cannot_run_engines() if "engine" in runs else None
    artifacts = []
    for name, model in models.items():
        onnx = export_onnx(model, list(input_shape), folder / f"{name}.onnx") if runs & {"onnx", "engine"} else None
        engine = build_engine(EngineSpec(onnx, input_shape, max_batch)).path if onnx and "engine" in runs and no_engines is None else None
        artifacts.append(Artifact(name, model, input_shape, onnx=onnx, engine=engine))
    runnable, skipped = build_backends(list(names), artifacts)
    if no_engines is not None:
        skipped |= {key: no_engines for key in skipped if BACKENDS.get(key.split(":", 1)[0]).runs == "engine"}
    return runnable, skipped


def latency_cost(backend: str, batch: int, input_shape: tuple[int, ...],
                 policy: TimingPolicy = TimingPolicy(warmup=5, min_iters=30, min_seconds=0.5)) -> Callable[[nn.Module], float]:
    """The median latency in ms of a model on one bench backend at one batch size: the cost a
    ``pruning.target.latency`` is solved for, measured as ``rapc bench`` will measure the result
    (an ONNX backend times the model exported, as served)."""
    def cost(model: nn.Module) -> float:
        with tempfile.TemporaryDirectory(prefix="rapc-latency-") as folder:
            runnable, skipped = backends_for_models([backend], {"model": model}, input_shape, Path(folder), batch)
            if not runnable:
                raise RapcError(f"pruning.target.backend {backend} cannot run here: {'; '.join(skipped.values())}")
            return measure(runnable, batch, policy)[0].p50_ms
    return cost
