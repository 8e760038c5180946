"""Runners: the one interface over the runtimes a model is served on, in the manner of
Polygraphy's. Export's fidelity check compares two runners' ``infer``; bench times a runner's
``prepare`` / ``run`` / ``transfer``; neither cares which runtime is behind it.

``infer`` takes and returns float32 numpy arrays (images in [0, 1], logits), any batch size.
``prepare`` stages a batch once where the runtime computes (host memory for CPU runtimes,
device memory for GPU ones), so that ``run`` times compute alone and ``transfer`` the
host-to-device copy a served request adds.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from rapc.errors import RapcError, require


class Runner:
    name: str
    runtime: str  # what serves the model, for labels: "PyTorch CPU", "onnxruntime CPU", "TensorRT"
    device: ClassVar[str] = "cpu"  # where ``run`` computes: "cuda" runners are timed with CUDA events

    def infer(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def prepare(self, images: np.ndarray) -> None:
        raise NotImplementedError

    def run(self) -> None:
        """One inference of the prepared batch, finished when it returns (GPU runners synchronize)."""
        raise NotImplementedError

    def transfer(self) -> None:
        """Copy the prepared batch from host memory to the device again (a no-op on the CPU)."""


class TorchRunner(Runner):
    """A PyTorch module, eager; subclasses change only how the forward pass is called (``_forward``)."""

    def __init__(self, model: nn.Module, name: str = "pytorch", device: str = "cpu") -> None:
        # On a GPU the runner holds its own copy: moving a shared module would pull it from under CPU runners.
        self.model = (model if device == "cpu" else copy.deepcopy(model)).eval().to(device)
        self.name, self.device = name, device  # type: ignore[misc]
        self.runtime = f"PyTorch {device.upper()}"

    @torch.no_grad()
    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(images).to(self.device)).float().cpu().numpy()

    def _forward(self):
        return self.model

    def prepare(self, images: np.ndarray) -> None:
        self.host = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if self.device == "cuda":
            self.host = self.host.pin_memory()
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


class OnnxRuntimeRunner(Runner):
    """An ONNX file in onnxruntime. With a GPU provider first, the prepared batch and the output
    are bound on the GPU (io_binding), so ``run`` times compute, not copies."""

    def __init__(self, path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",), threads: int | None = None) -> None:
        self.ort = ort = require("onnxruntime", "pip install onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: fp16 graphs log a constant-folding warning per node
        if threads:
            options.intra_op_num_threads = threads
        # Idle worker threads sleep instead of spinning: a spinning pool steals the cores from
        # whatever runs next (another session, PyTorch), which wrecked interleaved timings.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            raise RapcError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        self.input = self.session.get_inputs()[0].name
        provider = self.session.get_providers()[0]
        self.device = "cpu" if provider == "CPUExecutionProvider" else "cuda"  # type: ignore[misc]
        self.name = f"onnxruntime:{provider}:{Path(path).name}"
        self.runtime = f"onnxruntime {provider.removesuffix('ExecutionProvider')}"

    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(images, dtype=np.float32)})[0].astype(np.float32)

    def prepare(self, images: np.ndarray) -> None:
        self.host = np.ascontiguousarray(images, dtype=np.float32)
        if self.device == "cuda":
            self.device_input = self.ort.OrtValue.ortvalue_from_numpy(self.host, "cuda", 0)
            self.binding = self.session.io_binding()
            self.binding.bind_ortvalue_input(self.input, self.device_input)
            self.binding.bind_output(self.session.get_outputs()[0].name, "cuda")

    def run(self) -> None:
        if self.device == "cuda":
            self.session.run_with_iobinding(self.binding)
        else:
            self.session.run(None, {self.input: self.host})

    def transfer(self) -> None:
        if self.device == "cuda":
            self.device_input.update_inplace(self.host)
