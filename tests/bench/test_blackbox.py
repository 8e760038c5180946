"""Square through a runner (rapc.bench.blackbox) and the deployed figures built on it
(rapc.bench.robustness): a real digits LeNet, exported to a real ONNX file, attacked through
onnxruntime, PyTorch and, on a GPU machine, onnxruntime CUDA and TensorRT."""

import numpy as np
import pytest
import torch

from rapc.bench.blackbox import square, unresponsive
from rapc.bench.robustness import bench_protocol, deployed, deployed_warnings, replay_per_image
from rapc.config import AttackConfig
from rapc.export.onnx import export_onnx
from rapc.export.runners import OnnxRuntimeRunner, Runner, TorchRunner
from rapc.judge import judge

QUERIES = 300  # a tenth of a second per 100 digits; the default is the reference 5000
N = 100


@pytest.fixture(scope="module")
def onnx_file(trained_lenet, tmp_path_factory):
    """The non-robust LeNet of conftest (clean training only) as a real ONNX file."""
    return export_onnx(trained_lenet, [1, 8, 8], tmp_path_factory.mktemp("blackbox") / "lenet.onnx")


@pytest.fixture(scope="module")
def images(digits_batch):
    return digits_batch[0][:N], digits_batch[1][:N]


class ConstantRunner(Runner):
    """A broken deployment: the same logits whatever the input (class 3 wins)."""

    name, runtime = "constant", "constant logits"

    def infer(self, images: np.ndarray) -> np.ndarray:
        return np.tile(np.eye(10, dtype=np.float32)[3], (len(images), 1))


def test_square_through_onnxruntime_breaks_a_non_robust_model_querying_only_what_stands(onnx_file, images):
    x, y = images
    runner = OnnxRuntimeRunner(onnx_file)
    clean = float((runner.infer(x.numpy()).argmax(1) == y.numpy()).mean())
    result = square(runner, x, y, 0.2, artifact="lenet.onnx", precision="fp32", queries=QUERIES)
    assert result.label == "Square-300 on lenet.onnx (onnxruntime CPU, fp32)" and result.n == N
    assert clean > 0.9 and result.accuracy < clean - 0.3, (clean, result.accuracy)
    assert result.stderr == pytest.approx((result.accuracy * (1 - result.accuracy) / N) ** 0.5)
    assert result.details["square"] == round((clean - result.accuracy) * N)
    # what it returns fools the file itself, and stays in the eps-ball and in [0, 1]
    fooled = ~result.correct
    assert (runner.infer(result.images[fooled].numpy()).argmax(1) != y[fooled].numpy()).all()
    assert (result.images - x).abs().max() <= 0.2 + 1e-6 and result.images.min() >= 0 and result.images.max() <= 1
    # broken images leave the query loop: far fewer rows than every clean-correct image for every query
    assert result.details["queries"] < 0.5 * clean * N * QUERIES


def test_square_through_onnxruntime_and_pytorch_agree_at_a_fixed_seed(trained_lenet, onnx_file, images):
    x, y = images
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    on_file = square(OnnxRuntimeRunner(onnx_file), x, y, 0.1, artifact="lenet.onnx", precision="fp32", queries=QUERIES)
    assert torch.equal(torch.rand(3), expected)  # Square reseeds the global generator; the caller's is restored
    on_torch = square(TorchRunner(trained_lenet), x, y, 0.1, artifact="lenet", precision="fp32", queries=QUERIES)
    assert 0.3 < on_file.accuracy < 0.9  # the attack had work to do: agreement is not trivial
    assert abs(int(on_file.correct.sum()) - int(on_torch.correct.sum())) <= 1
    again = square(OnnxRuntimeRunner(onnx_file), x, y, 0.1, artifact="lenet.onnx", precision="fp32", queries=QUERIES)
    assert torch.equal(again.correct, on_file.correct) and torch.equal(again.images, on_file.images)


def test_a_runner_returning_constant_logits_is_flagged_and_an_honest_one_is_not(trained_lenet, onnx_file, images):
    x, y = images
    protocol = bench_protocol(AttackConfig(eps=0.1, steps=10), "quick", n_ensemble=40)
    verdict = judge(trained_lenet, x, y, protocol)
    entries = {}
    for key, runner in (("lenet.onnx", OnnxRuntimeRunner(onnx_file)), ("constant.onnx", ConstantRunner())):
        replayed = replay_per_image(runner, verdict, y)
        entries[key] = {"artifact": key, "model": "dense", "precision": "fp32", "backend": "ort-cpu"} | deployed(
            runner, key, "fp32", verdict, replayed, x, y, protocol, n=N, queries=QUERIES)
    constant, honest = entries["constant.onnx"], entries["lenet.onnx"]
    assert constant["n"] == honest["n"] == 40  # capped at the ensemble's n: the PyTorch figure is on the same images
    # Square cannot move constant logits: every class-3 image survives it, and none responds to eps
    threes = int((y[:40] == 3).sum())
    assert threes > 0 and constant["square"]["accuracy"] == pytest.approx(threes / 40) and constant["square"]["unresponsive"] == threes
    assert honest["square"]["unresponsive"] == 0
    assert honest["deployed"]["accuracy"] <= min(honest["replay"]["accuracy"], honest["square"]["accuracy"])
    warnings = deployed_warnings(entries)
    flagged = [w for w in warnings if "do not respond" in w]
    assert len(flagged) == 1 and flagged[0].startswith(f"constant.onnx (ort-cpu): {threes} of the {threes} images that survived "
                                                       "Square-300 on constant.onnx (constant logits, fp32)")
    assert unresponsive(ConstantRunner(), x, torch.ones(N, dtype=torch.bool), 0.1) == N


def _entry(precision: str, deployed_accuracy: float, pytorch: float, model: str = "compressed") -> dict:
    figure = {"accuracy": deployed_accuracy, "stderr": 0.0, "label": "worst case per image of replay and Square-5000", "n": 200}
    return {"artifact": model, "model": model, "precision": precision, "backend": "ort-cpu", "n": 200, "deployed": figure,
            "pytorch": {"accuracy": pytorch}, "square": {"accuracy": deployed_accuracy, "unresponsive": 0, "label": "Square-5000"}}


def test_deployed_warnings_fire_above_one_point_below_the_model_and_two_points_of_quantization():
    within = {"compressed.onnx": _entry("fp32", 0.600, 0.605), "compressed.int8.onnx": _entry("int8", 0.585, 0.59)}
    assert deployed_warnings(within) == []  # 0.5 points below the model, 1.5 points of quantization
    beyond = {"compressed.onnx": _entry("fp32", 0.600, 0.615), "compressed.int8.onnx": _entry("int8", 0.575, 0.58)}
    warnings = deployed_warnings(beyond)
    assert len(warnings) == 2
    assert warnings[0].startswith("compressed.onnx (ort-cpu): deployed robust accuracy 60.0% (worst case per image of replay and "
                                  "Square-5000, n=200) is 1.5 points below the 61.5% the white-box attacks left on the PyTorch model")
    assert warnings[1].startswith("compressed.int8.onnx (ort-cpu): int8 costs 2.5 points of deployed robust accuracy against the fp32 file")


# onnxruntime's TensorRT provider is left out: it builds an engine per input shape, and Square's batch
# shrinks as images break; the engine runner below is how rapc runs TensorRT.
@pytest.mark.gpu
def test_square_through_onnxruntime_cuda_matches_the_cpu(onnx_file, images):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (pip install 'rapc[gpu]')")
    x, y = images
    runner = OnnxRuntimeRunner(onnx_file, ("CUDAExecutionProvider",))
    gpu = square(runner, x, y, 0.1, artifact="lenet.onnx", precision="fp32", queries=QUERIES)
    cpu = square(OnnxRuntimeRunner(onnx_file), x, y, 0.1, artifact="lenet.onnx", precision="fp32", queries=QUERIES)
    assert runner.device == "cuda" and gpu.label == "Square-300 on lenet.onnx (onnxruntime CUDA, fp32)"
    # TF32 convolutions on the GPU move the logits by ~1e-3: a near tie may go the other way, hence 2 images, not 1
    assert abs(int(gpu.correct.sum()) - int(cpu.correct.sum())) <= 2 and gpu.accuracy < 0.9


@pytest.mark.gpu
def test_square_through_a_tensorrt_engine_matches_onnxruntime(onnx_file, images):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'rapc[gpu]')")
    from rapc.export.tensorrt import EngineSpec, TensorRTRunner, build_engine

    built = build_engine(EngineSpec(onnx_file, (1, 8, 8), max_batch=N))
    x, y = images
    engine = square(TensorRTRunner(built.path), x, y, 0.1, artifact=built.path.name, precision="fp32", queries=QUERIES)
    cpu = square(OnnxRuntimeRunner(onnx_file), x, y, 0.1, artifact="lenet.onnx", precision="fp32", queries=QUERIES)
    assert engine.label == f"Square-300 on {built.path.name} (TensorRT, fp32)"
    assert abs(int(engine.correct.sum()) - int(cpu.correct.sum())) <= 2 and engine.accuracy < 0.9
