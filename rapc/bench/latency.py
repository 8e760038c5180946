"""Latency the way trtexec and MLPerf measure it: warm up, then time until both a minimum
count and a minimum time are reached; report percentiles, throughput and spread.

Backends measured together are interleaved (every round runs each once), so a ratio
between them (dense vs compressed) comes from one run under the same conditions.
GPU backends are timed with CUDA events around a synchronized call, CPU ones with
perf_counter. Input transfer is timed separately from compute.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from rapc.bench.backends import BACKENDS, Artifact, Backend
from rapc.errors import RapcError
from rapc.progress import Reporter


@dataclass(frozen=True)
class TimingPolicy:
    warmup: int = 10
    min_iters: int = 50
    min_seconds: float = 1.0
    max_seconds: float = 60.0  # a cap per batch size, whatever min_iters asks
    cv_warning: float = 0.15  # coefficient of variation above which the figure is flagged


@dataclass(frozen=True)
class Latency:
    backend: str
    artifact: str
    batch: int
    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cv: float  # std / mean of the per-call times
    images_per_s: float
    transfer_ms: float | None  # host-to-device copy of the batch, GPU backends only

    def as_dict(self) -> dict:
        return asdict(self)


def _timer(backend: Backend):
    """A function timing one call of ``fn`` in seconds on the backend's device."""
    if backend.device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def gpu(fn) -> float:
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return gpu

    def cpu(fn) -> float:
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin

    return cpu


def _summary(name: str, artifact: str, batch: int, seconds: list[float], transfer: list[float]) -> Latency:
    ms = np.asarray(seconds) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return Latency(name, artifact, batch, len(ms), mean, float(p50), float(p90), float(p99),
                   float(ms.std() / mean) if mean else 0.0, batch / (mean / 1e3),
                   float(np.mean(transfer) * 1e3) if transfer else None)


def measure(backends: Mapping[tuple[str, str], Backend], batch: int, policy: TimingPolicy = TimingPolicy()) -> list[Latency]:
    """Time every (backend name, artifact name) -> backend at one batch size, interleaved."""
    if batch < 1:
        raise RapcError(f"batch size must be at least 1, got {batch}")
    if not backends:
        return []
    for backend in backends.values():
        backend.prepare(batch)
    timers = {key: _timer(b) for key, b in backends.items()}
    for _ in range(policy.warmup):
        for backend in backends.values():
            backend.run()
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in backends}
    started = time.perf_counter()
    while True:
        for key, backend in backends.items():
            samples[key].append(timers[key](backend.run))
        elapsed = time.perf_counter() - started
        rounds = len(next(iter(samples.values())))
        if (rounds >= policy.min_iters and elapsed >= policy.min_seconds) or elapsed >= policy.max_seconds:
            break
    results = []
    for key, backend in backends.items():
        transfer = [timers[key](backend.transfer) for _ in range(10)] if backend.device == "cuda" else []
        results.append(_summary(key[0], key[1], batch, samples[key], transfer))
    return results


def measure_backends(runnable: Mapping[tuple[str, str], Backend], batch_sizes: Sequence[int], policy: TimingPolicy,
                     reporter: Reporter) -> list[Latency]:
    """``measure`` per backend and batch size. The artifacts of one backend are interleaved (their
    ratio comes from one run); backends run one after another, since two runtimes' thread pools
    alternating on the same cores slow each other."""
    by_backend: dict[str, dict[tuple[str, str], Backend]] = {}
    for key, backend in runnable.items():
        by_backend.setdefault(key[0], {})[key] = backend
    results: list[Latency] = []
    reporter.begin("latency", len(batch_sizes) * len(by_backend))
    for batch in batch_sizes:
        for group in by_backend.values():
            results += measure(group, batch, policy)
            reporter.advance()
    reporter.end(f"latency: {len(runnable)} backend x artifact pairs at batch {', '.join(map(str, batch_sizes))}")
    return results


def build_backends(names: list[str], artifacts: list[Artifact]) -> tuple[dict[tuple[str, str], Backend], dict[str, str]]:
    """The backends that can run here for every artifact, and the skipped ones with their reason."""
    runnable: dict[tuple[str, str], Backend] = {}
    skipped: dict[str, str] = {}
    for name in names:
        cls = BACKENDS.get(name)
        for artifact in artifacts:
            reason = cls.skip_reason(artifact)
            if reason is not None:
                skipped[f"{name}:{artifact.name}"] = reason
            else:
                runnable[(name, artifact.name)] = cls(artifact)
    return runnable, skipped
