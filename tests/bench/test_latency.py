import shutil

import numpy as np
import pytest
import torch

from rapc.bench.backends import Artifact
from rapc.bench.latency import TimingPolicy, TimingStats, backends_for_models, build_backends, measure, time_interleaved
from rapc.export.tensorrt import cannot_run_engines
from rapc.errors import RapcError
from rapc.export.artifacts import export_run
from rapc.modelio import load_model

QUICK = TimingPolicy(warmup=2, min_iters=15, min_seconds=0.2)


@pytest.fixture(scope="module")
def artifacts(digits_run, tmp_path_factory):
    run = shutil.copytree(digits_run, tmp_path_factory.mktemp("bench") / "run")
    export_run(run, dense=True, n_check=20)
    return [
        Artifact("dense", load_model(run / "dense"), (1, 8, 8), onnx=run / "export" / "dense.onnx"),
        Artifact("compressed", load_model(run / "compressed"), (1, 8, 8), onnx=run / "export" / "compressed.onnx"),
    ]


def _sane(result, batch: int, policy: TimingPolicy) -> None:
    assert result.batch == batch and result.n >= policy.min_iters
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.images_per_s == pytest.approx(batch / (result.mean_ms / 1e3))
    assert result.cv >= 0


@pytest.mark.parametrize("backend", ["torch-eager", "ort-cpu", "torch-compiled"])
def test_each_cpu_backend_times_dense_and_shrunk_models_interleaved(artifacts, backend):
    runnable, skipped = build_backends([backend], artifacts)
    assert not skipped and set(runnable) == {(backend, "dense"), (backend, "compressed")}
    results = measure(runnable, batch=8, policy=QUICK)
    assert {(r.backend, r.artifact) for r in results} == set(runnable)
    for result in results:
        _sane(result, 8, QUICK)
        assert result.transfer_ms is None  # CPU inputs need no copy
    counts = {r.n for r in results}
    assert len(counts) == 1  # interleaved: every backend ran once per round


def test_timing_stops_at_the_time_cap_even_below_the_minimum_count(artifacts):
    runnable, _ = build_backends(["torch-eager"], artifacts[1:])
    (result,) = measure(runnable, batch=1, policy=TimingPolicy(warmup=1, min_iters=10**9, min_seconds=0.0, max_seconds=0.3))
    assert 1 <= result.n < 10**9


def test_backends_that_cannot_run_here_are_listed_with_a_reason(artifacts):
    bare = Artifact("compressed", artifacts[1].model, (1, 8, 8))  # no ONNX file, no engine
    _, skipped = build_backends(["ort-cpu", "tensorrt"], [bare])
    assert skipped == {
        "ort-cpu:compressed": "no ONNX file (run `rapc export` first)",
        "tensorrt:compressed": "no TensorRT engine (run `rapc export --trt` first)",
    }
    if not torch.cuda.is_available():
        _, skipped = build_backends(["torch-eager-cuda", "torch-cudagraphs", "ort-cuda"], artifacts[1:])
        assert skipped["torch-eager-cuda:compressed"] == "no CUDA GPU"
        assert skipped["torch-cudagraphs:compressed"] == "no CUDA GPU"
        assert "onnxruntime has no CUDAExecutionProvider" in skipped["ort-cuda:compressed"]


def test_bad_batch_sizes_and_unknown_backends_are_user_errors(artifacts):
    runnable, _ = build_backends(["torch-eager"], artifacts[1:])
    with pytest.raises(RapcError, match="batch size must be at least 1"):
        measure(runnable, batch=0)
    with pytest.raises(RapcError, match="unknown bench backend 'tensorflow'; known: .*ort-cpu"):
        build_backends(["tensorflow"], artifacts)


@pytest.mark.gpu
def test_gpu_backends_time_with_cuda_events_and_report_transfer(artifacts):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    runnable, _ = build_backends(["torch-eager-cuda", "torch-cudagraphs"], artifacts)
    for result in measure(runnable, batch=64, policy=QUICK):
        _sane(result, 64, QUICK)
        assert result.transfer_ms is not None and result.transfer_ms > 0


def test_interleaved_timing_calls_each_function_once_per_round_after_the_warmup():
    order: list[str] = []
    policy = TimingPolicy(warmup=2, min_iters=3, min_seconds=0.0)
    samples = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, policy)
    assert order == ["a", "b"] * 5  # 2 warm-up rounds, then exactly min_iters timed ones
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    assert all(s >= 0 for v in samples.values() for s in v)


def test_interleaved_timing_uses_the_timer_given_for_a_call():
    samples = time_interleaved({"x": lambda: None}, TimingPolicy(warmup=0, min_iters=2, min_seconds=0.0), {"x": lambda fn: 0.25})
    assert samples == {"x": [0.25, 0.25]}


def test_timing_stats_are_milliseconds_with_percentiles_and_spread():
    stats = TimingStats.of([0.001, 0.002, 0.003, 0.004])
    assert stats.n == 4 and stats.mean_ms == pytest.approx(2.5)
    assert stats.p50_ms == pytest.approx(2.5) and stats.p50_ms <= stats.p90_ms <= stats.p99_ms <= 4.0
    assert stats.cv == pytest.approx(np.std([1, 2, 3, 4]) / 2.5)
    with pytest.raises(ValueError, match="no timings"):
        TimingStats.of([])


def test_models_in_memory_get_onnx_files_for_onnx_backends_and_engines_are_skipped_with_why(tmp_path):
    models = {"dense": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
              "small": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))}
    runnable, skipped = backends_for_models(["torch-eager", "ort-cpu", "tensorrt"], models, (1, 8, 8), tmp_path, max_batch=8)
    assert {"dense.onnx", "small.onnx"} <= {p.name for p in tmp_path.iterdir()}
    assert {("torch-eager", "dense"), ("ort-cpu", "small")} <= set(runnable)
    results = measure(runnable, batch=2, policy=TimingPolicy(warmup=1, min_iters=2, min_seconds=0.0))
    assert {(r.backend, r.artifact) for r in results} == set(runnable)
    if cannot_run_engines() is not None:
        assert skipped == {"tensorrt:dense": cannot_run_engines(), "tensorrt:small": cannot_run_engines()}


def test_models_in_memory_are_not_exported_when_no_backend_runs_files(tmp_path):
    runnable, skipped = backends_for_models(["torch-eager"], {"m": torch.nn.Flatten()}, (1, 8, 8), tmp_path, max_batch=8)
    assert set(runnable) == {("torch-eager", "m")} and not skipped and not any(tmp_path.iterdir())
