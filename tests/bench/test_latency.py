import shutil

import pytest
import torch

from rapc.bench.backends import Artifact
from rapc.bench.latency import TimingPolicy, build_backends, measure
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
        Artifact("compressed", load_model(run / "model"), (1, 8, 8), onnx=run / "export" / "model.onnx"),
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
