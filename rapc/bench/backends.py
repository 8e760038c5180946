"""Inference backends with one interface, so latency is measured the same way on each.

A backend is built from an ``Artifact`` (the PyTorch model and the files exported from
it), ``prepare``s a batch once, then ``run``s it. Input transfer is outside ``run``:
inputs live where the backend computes (host memory for CPU runtimes, device memory
for GPU ones), so ``run`` times compute; ``transfer`` times the host-to-device copy
that a served request adds. A backend that cannot run here says why (``skip_reason``)
and is listed as skipped, never dropped.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

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
    device: ClassVar[str] = "cpu"
    runs: ClassVar[str]  # what of the artifact it runs: "model" (PyTorch), "onnx" or "engine"

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact

    @classmethod
    def skip_reason(cls, artifact: Artifact) -> str | None:
        """Why this backend cannot run ``artifact`` here, or None."""
        return None

    def prepare(self, batch: int) -> None:
        raise NotImplementedError

    def run(self) -> None:
        """One inference of the prepared batch, finished when it returns (GPU backends synchronize)."""
        raise NotImplementedError

    def transfer(self) -> None:
        """Copy the prepared batch from pinned host memory to the device (no-op on CPU)."""


BACKENDS: Registry[type[Backend]] = Registry("bench backend")


def _no_cuda() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA GPU"


class _Torch(Backend):
    runs = "model"

    @classmethod
    def skip_reason(cls, artifact: Artifact) -> str | None:
        return None if artifact.model is not None else "an ONNX-only precision variant (no PyTorch model)"

    def __init__(self, artifact: Artifact) -> None:
        super().__init__(artifact)
        # A GPU backend gets its own copy: moving the shared module would pull it from under the CPU backends.
        model = artifact.model if self.device == "cpu" else copy.deepcopy(artifact.model)
        self.module = model.eval().to(self.device)  # type: ignore[union-attr]

    def _forward(self):
        return self.module

    def prepare(self, batch: int) -> None:
        self.host = torch.rand(batch, *self.artifact.input_shape).pin_memory() if self.device == "cuda" else torch.rand(batch, *self.artifact.input_shape)
        self.input = self.host.to(self.device)
        self.forward = self._forward()

    @torch.inference_mode()
    def run(self) -> None:
        self.forward(self.input)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def transfer(self) -> None:
        if self.device == "cuda":
            self.input.copy_(self.host, non_blocking=True)
            torch.cuda.synchronize()


@BACKENDS.register("torch-eager")
class TorchEager(_Torch):
    pass


@BACKENDS.register("torch-compiled")
class TorchCompiled(_Torch):
    """torch.compile (inductor), compiled once per batch size in ``prepare``."""

    def _forward(self):
        compiled = torch.compile(self.module, dynamic=False)
        with torch.inference_mode():
            compiled(self.input)  # compile outside the timed region
        return compiled


class _OnCuda:
    """Mixed in first: runs on the GPU, and only where there is one."""

    device = "cuda"

    @classmethod
    def skip_reason(cls, artifact: Artifact) -> str | None:
        return _no_cuda() or super().skip_reason(artifact)  # type: ignore[misc]


@BACKENDS.register("torch-eager-cuda")
class TorchEagerCuda(_OnCuda, _Torch):
    pass


@BACKENDS.register("torch-compiled-cuda")
class TorchCompiledCuda(_OnCuda, TorchCompiled):
    pass


@BACKENDS.register("torch-cudagraphs")
class TorchCudaGraphs(_OnCuda, _Torch):
    """The forward pass captured once in a CUDA graph and replayed: no per-kernel launch cost,
    which dominates small batches on a GPU."""

    def _forward(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                self.module(self.input)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            self.module(self.input)
        return lambda _: graph.replay()


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

    def __init__(self, artifact: Artifact) -> None:
        super().__init__(artifact)
        import onnxruntime as ort

        from rapc.export.runners import OnnxRuntimeRunner

        self.ort = ort
        # the same pinned thread count as PyTorch, so CPU figures compare like with like
        runner = OnnxRuntimeRunner(artifact.onnx, (self.provider,), threads=torch.get_num_threads())  # type: ignore[arg-type]
        self.session, self.input_name = runner.session, runner.input

    def prepare(self, batch: int) -> None:
        self.host = np.random.rand(batch, *self.artifact.input_shape).astype(np.float32)

    def run(self) -> None:
        self.session.run(None, {self.input_name: self.host})


@BACKENDS.register("ort-cpu")
class OrtCpu(_OnnxRuntime):
    provider = "CPUExecutionProvider"


@BACKENDS.register("ort-cuda")
class OrtCuda(_OnnxRuntime):
    """Inputs and outputs bound on the GPU (io_binding), so ``run`` times compute, not copies."""

    provider = "CUDAExecutionProvider"
    device = "cuda"

    def prepare(self, batch: int) -> None:
        super().prepare(batch)
        self.device_input = self.ort.OrtValue.ortvalue_from_numpy(self.host, "cuda", 0)
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(self.input_name, self.device_input)
        self.binding.bind_output(self.session.get_outputs()[0].name, "cuda")

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def transfer(self) -> None:
        self.device_input.update_inplace(self.host)


@BACKENDS.register("ort-trt")
class OrtTensorRT(OrtCuda):
    provider = "TensorrtExecutionProvider"


@BACKENDS.register("tensorrt")
class TensorRT(Backend):
    device = "cuda"
    runs = "engine"

    @classmethod
    def skip_reason(cls, artifact: Artifact) -> str | None:
        from rapc.export.tensorrt import cannot_run_engines

        if artifact.engine is None:
            return "no TensorRT engine (run `rapc export --trt` first)"
        return cannot_run_engines()

    def __init__(self, artifact: Artifact) -> None:
        super().__init__(artifact)
        from rapc.export.tensorrt import TensorRTRunner

        self.runner = TensorRTRunner(artifact.engine)  # type: ignore[arg-type]

    def prepare(self, batch: int) -> None:
        self.host = torch.rand(batch, *self.artifact.input_shape).pin_memory()
        self.input = self.host.cuda()

    def run(self) -> None:
        self.runner.infer_torch(self.input)

    def transfer(self) -> None:
        self.input.copy_(self.host, non_blocking=True)
        torch.cuda.synchronize()
