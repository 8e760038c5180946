import sys
import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from rapc.errors import RapcError
from rapc.export.artifacts import export_run
from rapc.export.precision import to_fp16


@pytest.fixture(scope="module")
def variants(digits_run, tmp_path_factory):
    run = shutil.copytree(digits_run, tmp_path_factory.mktemp("precision") / "run")
    result = export_run(run, precisions=("fp16", "int8"), n_check=300, n_calibration=256)
    report = json.loads((run / "export" / "fidelity.json").read_text())["artifacts"]
    return {p.name: p for p in result.files}, report


def test_fp16_variant_has_fp16_weights_and_float32_io(variants):
    files, report = variants
    graph = onnx.load(str(files["compressed.fp16.onnx"]))
    assert graph.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    weights = [w for w in graph.graph.initializer if len(w.dims) > 1]
    assert weights and all(w.data_type == TensorProto.FLOAT16 for w in weights)
    entry = report["compressed.fp16.onnx"]
    assert entry["reference"].startswith("onnxruntime") and entry["clean"]["top1_agreement"] >= 0.99
    assert 0 < entry["clean"]["max_abs_diff"] < 0.05  # really computed in fp16, and close


def test_int8_variant_is_symmetric_explicit_quantization(variants):
    files, report = variants
    graph = onnx.load(str(files["compressed.int8.onnx"]))
    ops = Counter(n.op_type for n in graph.graph.node)
    assert ops["QuantizeLinear"] >= 2 and ops["DequantizeLinear"] >= 2
    initializers = {i.name: i for i in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) == 3 and node.input[2] in initializers:
            zero_point = numpy_helper.to_array(initializers[node.input[2]])
            assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric int8, as TensorRT requires
    entry = report["compressed.int8.onnx"]
    assert entry["clean"]["top1_agreement"] >= 0.95 and entry["adversarial"]["top1_agreement"] >= 0.9
    # Robustness is measured on the quantized file itself, on the same PGD examples.
    assert entry["adversarial"]["accuracy"] < entry["clean"]["accuracy"]
    assert abs(entry["adversarial"]["accuracy"] - report["compressed.onnx"]["adversarial"]["accuracy"]) < 0.1


def test_missing_model_optimizer_is_a_one_line_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "modelopt.onnx.autocast", None)  # as if not installed
    with pytest.raises(RapcError, match=r"rapc\[quant\]"):
        to_fp16(tmp_path / "compressed.onnx")
