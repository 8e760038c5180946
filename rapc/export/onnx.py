"""ONNX export: one self-contained file with a real dynamic batch dimension.

The exporter is torch 2.14's default, torch.export-based one (``dynamo=True``); the
TorchScript exporter still works but warns that it is going away. Its two defaults
that break deployment are overridden: weights go into the file (``external_data=False``,
not a side ``.onnx.data``), and the batch dimension is declared dynamic through
``dynamic_shapes``, keyed by the forward argument's name. The example batch has 2
images, because torch.export specializes a batch of 1 into a constant. The graph
optimizer folds constants and BatchNorm into the convolutions.

The input is ``input``: images in [0, 1]; normalization is inside the graph.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from rapc.errors import RapcError

OPSET = 18  # the oldest opset the torch.export-based exporter targets; TensorRT 10 and 11 parse it
INPUT, OUTPUT = "input", "logits"


def export_onnx(model: nn.Module, input_shape: list[int], path: Path, opset: int = OPSET) -> Path:
    """Write ``model`` (eval mode, on CPU) as ONNX with input [batch, *input_shape] named ``input``."""
    model = model.eval().cpu()
    example = torch.rand(2, *input_shape)
    argument = next(iter(inspect.signature(model.forward).parameters))
    batch = torch.export.Dim("batch", min=1, max=65536)
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, opset_version=opset, verbose=False,
                input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes={argument: {0: batch}},
                external_data=False, optimize=True,
            )
    except Exception as exc:  # torch.export raises many types; all mean "this model did not export"
        raise RapcError(f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return path
