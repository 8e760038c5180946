"""Bench backends: the named ways rapc bench can run an artifact, each opening one runner.

A backend is a registry entry (``BACKENDS``) that says what of an ``Artifact`` it runs (the
PyTorch model, the ONNX file or the TensorRT engine), why it cannot run here if it cannot
(``skip_reason``: listed as skipped, never dropped), and ``open``s a runner for it; timing
then goes through the runner interface of ``rapc.export.runners``, the same one export's
fidelity check uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from rapc.export.runners import OnnxRuntimeRunner, Runner, TorchRunner
from rapc.registry import Registry


@dataclass(frozen=True)
class Artifact:
    """One model in every form bench can run it: PyTorch, ONNX, TensorRT engine."""

    name: str  # "dense" or "compressed"
    model: nn.Module | None  # None for ONNX-only precision variants (fp16, int8)
    input_shape: tuple[int, ...]  # one image
    onnx: Path | None = None
    engine: Path | None = None


class Backend:
    runs: ClassVar[str]  # what of the artifact it runs: "model" (PyTorch), "onnx" or "engine"

    @classmethod
    def skip_reason(cls, artifact: Artifact) -> str | None:
        """Why this backend cannot run ``artifact`` here, or None."""
        return None

    @classmethod
    def open(cls, artifact: Artifact) -> Runner:
        raise NotImplementedError


BACKENDS: Registry[type[Backend]] = Registry("bench backend")


def _no_cuda() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA GPU"


class _Torch(Backend):
    runs = "model"
    device: ClassVar[str] = "cpu"
    runner: ClassVar[type[TorchRunner]] = TorchRunner

    @classmethod
    def skip_reason(cls, artifact: Artifact) -> str | None:
        if cls.device == "cuda" and (reason := _no_cuda()):
            return reason
        return None if artifact.model is not None else "an ONNX-only precision variant (no PyTorch model)"

    @classmethod
    def open(cls, artifact: Artifact) -> Runner:
        return cls.runner(artifact.model, f"{cls.__name__}:{artifact.name}", cls.device)  # type: ignore[arg-type]


class CompiledRunner(TorchRunner):
    """torch.compile (inductor), compiled once per prepared batch size, outside the timed region."""

    def _forward(self):
        compiled = torch.compile(self.model, dynamic=False)
        with torch.inference_mode():
            compiled(self.input)
        return compiled


class CudaGraphRunner(TorchRunner):
    """The forward pass captured once in a CUDA graph and replayed: no per-kernel launch cost,
    which dominates small batches on a GPU."""

    def _forward(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                self.model(self.input)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            self.model(self.input)
        return lambda _: graph.replay()


@BACKENDS.register("torch-eager")
class TorchEager(_Torch):
    pass


@BACKENDS.register("torch-compiled")
class TorchCompiled(_Torch):
    runner = CompiledRunner


@BACKENDS.register("torch-eager-cuda")
class TorchEagerCuda(_Torch):
    device = "cuda"


@BACKENDS.register("torch-compiled-cuda")
class TorchCompiledCuda(_Torch):
    device = "cuda"
    runner = CompiledRunner


@BACKENDS.register("torch-cudagraphs")
class TorchCudaGraphs(_Torch):
    device = "cuda"
    runner = CudaGraphRunner


class _OnnxRuntime(Backend):
    provider: ClassVar[str]
    runs = "onnx"

    @classmethod
    def skip_reason(cls, artifact: Artifact) -> str | None:
        if artifact.onnx is None:
            return "no ONNX file (run `rapc export` first)"
        import onnxruntime as ort

        if cls.provider not in ort.get_available_providers():
            return f"onnxruntime has no {cls.provider} (pip install 'rapc[gpu]' for onnxruntime-gpu)"
        return None

    @classmethod
    def open(cls, artifact: Artifact) -> Runner:
        # the same pinned thread count as PyTorch, so CPU figures compare like with like
        return OnnxRuntimeRunner(artifact.onnx, (cls.provider,), threads=torch.get_num_threads())  # type: ignore[arg-type]


@BACKENDS.register("ort-cpu")
class OrtCpu(_OnnxRuntime):
    provider = "CPUExecutionProvider"


@BACKENDS.register("ort-cuda")
class OrtCuda(_OnnxRuntime):
    provider = "CUDAExecutionProvider"


@BACKENDS.register("ort-trt")
class OrtTensorRT(_OnnxRuntime):
    provider = "TensorrtExecutionProvider"


@BACKENDS.register("tensorrt")
class TensorRT(Backend):
    runs = "engine"

    @classmethod
    def skip_reason(cls, artifact: Artifact) -> str | None:
        from rapc.export.tensorrt import cannot_run_engines

        if artifact.engine is None:
            return "no TensorRT engine (run `rapc export --trt` first)"
        return cannot_run_engines()

    @classmethod
    def open(cls, artifact: Artifact) -> Runner:
        from rapc.export.tensorrt import TensorRTRunner

        return TensorRTRunner(artifact.engine)  # type: ignore[arg-type]
