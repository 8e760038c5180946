"""Precision variants made on the ONNX graph, so TensorRT 10 and 11 and onnxruntime run the same files.

TensorRT 11 removed the FP16/INT8 builder flags and implicit int8 calibration: networks
are strongly typed, and precision must be written into the graph. NVIDIA Model
Optimizer is the tool TensorRT's migration guide names for that, and it runs on CPU:

- fp16: ``convert_to_mixed_precision(low_precision_type="fp16", keep_io_types=True)``,
  fp16 weights and compute, float32 inputs and outputs;
- int8: ``quantize(quantize_mode="int8")``, explicit Q/DQ nodes with symmetric int8
  weights (per channel) and activations (per tensor, entropy-calibrated) as TensorRT
  requires; the ops it leaves unquantized run in fp16.

onnxruntime's own quantizer was the alternative; Model Optimizer's output is what
TensorRT is tested against and its fp16 pass keeps I/O in float32, so it won. It is
installed without its ``[onnx]`` extra, which pins onnxruntime-gpu: ``rapc[quant]``
lists the few pure-Python packages it imports instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from rapc.errors import RapcError, require

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL = "pip install 'rapc[quant]'"


def variant_path(fp32: Path, precision: str) -> Path:
    """compressed.onnx -> compressed.fp16.onnx; fp32 is the file itself."""
    return fp32 if precision == "fp32" else fp32.with_suffix(f".{precision}.onnx")


@contextlib.contextmanager
def _quiet():
    """Model Optimizer and onnxruntime's calibrator print progress bars and INFO/WARNING lines
    (through handlers bound to the real stdout); keep them off the terminal."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def to_fp16(fp32: Path) -> Path:
    autocast = require("modelopt.onnx.autocast", INSTALL)
    onnx = require("onnx", "pip install onnx")
    out = variant_path(fp32, "fp16")
    with _quiet():
        model = autocast.convert_to_mixed_precision(onnx_path=str(fp32), low_precision_type="fp16", keep_io_types=True)
    onnx.save(model, str(out))
    return out


def to_int8(fp32: Path, calibration: np.ndarray) -> Path:
    """Q/DQ int8, calibrated on ``calibration`` (float32 images in [0, 1], a few hundred)."""
    quantization = require("modelopt.onnx.quantization", INSTALL)
    out = variant_path(fp32, "int8")
    with _quiet():
        quantization.quantize(
            onnx_path=str(fp32), quantize_mode="int8", calibration_data=calibration.astype(np.float32),
            calibration_eps=["cpu"], high_precision_dtype="fp16", output_path=str(out), log_level="WARNING",
        )
    if not out.is_file():
        raise RapcError(f"int8 quantization of {fp32} wrote no file")
    return out


def make_variant(fp32: Path, precision: str, calibration: np.ndarray) -> Path:
    if precision == "fp32":
        return fp32
    if precision == "fp16":
        return to_fp16(fp32)
    if precision == "int8":
        return to_int8(fp32, calibration)
    raise RapcError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
