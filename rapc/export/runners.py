"""Runners: one small interface over the runtimes a model is served on, in the manner of
Polygraphy's. Export fidelity checks and bench latency compare runners without caring
which is which. Inputs and outputs are float32 numpy arrays; images in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from rapc.errors import RapcError, require


class Runner(Protocol):
    name: str

    def infer(self, images: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    def __init__(self, model: nn.Module, name: str = "pytorch") -> None:
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(images).to(self.device)).float().cpu().numpy()


class OnnxRuntimeRunner:
    def __init__(self, path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",), threads: int | None = None) -> None:
        ort = require("onnxruntime", "pip install onnxruntime")
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
        self.name = f"onnxruntime:{self.session.get_providers()[0]}:{Path(path).name}"

    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(images, dtype=np.float32)})[0].astype(np.float32)
