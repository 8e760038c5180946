import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from rapc.cli import main
from rapc.errors import RapcError
from rapc.export.artifacts import EngineOptions, export_run
from rapc.export.onnx import export_onnx
from rapc.export.tensorrt import EngineSpec, TensorRTRunner, build_engine, check_can_build
from rapc.modelio import Architecture

tensorrt_rtx = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx (TensorRT for RTX) is not installed")


def test_profile_spans_batch_one_to_max_and_tunes_for_a_power_of_two(tmp_path):
    spec = EngineSpec(tmp_path / "compressed.fp16.onnx", (3, 32, 32), max_batch=100)
    assert spec.profile() == ((1, 3, 32, 32), (64, 3, 32, 32), (100, 3, 32, 32))
    assert EngineSpec(tmp_path / "m.onnx", (1, 8, 8), max_batch=24).profile()[1] == (16, 1, 8, 8)
    assert EngineSpec(tmp_path / "m.onnx", (1, 8, 8), max_batch=1).profile() == ((1, 1, 8, 8),) * 3
    with pytest.raises(RapcError, match="at least 1"):
        EngineSpec(tmp_path / "m.onnx", (1, 8, 8), max_batch=0).profile()


def test_engine_files_are_named_after_their_onnx_file_backend_and_target(tmp_path):
    trt = EngineSpec(tmp_path / "compressed.int8.onnx", (1, 8, 8))
    rtx = EngineSpec(tmp_path / "dense.onnx", (1, 8, 8), backend="tensorrt-rtx", target="SM89")
    assert (trt.engine.name, trt.timing_cache.name) == ("compressed.int8.trt.engine", "compressed.int8.trt.timing.cache")
    assert rtx.engine.name == "dense.rtx-sm89.engine"


def test_asking_for_tensorrt_without_it_is_an_error_naming_the_gpu_extra_and_trt_rtx_never_a_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RapcError) as info:
        check_can_build("tensorrt")
    message = str(info.value)
    assert "TensorRT is not installed (pip install 'rapc[gpu]')" in message and "--trt-rtx" in message
    assert "pip install tensorrt-rtx" not in message  # it is installed here: nothing to install for the alternative
    check_can_build("tensorrt-rtx")
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    assert "--trt-rtx" in str(pytest.raises(RapcError, check_can_build, "tensorrt").value)
    with pytest.raises(RapcError, match=r"tensorrt_rtx is not installed; install it with `pip install tensorrt-rtx`"):
        check_can_build("tensorrt-rtx")


@pytest.mark.parametrize("rtx_installed", [True, False], ids=["tensorrt-rtx-installed", "no-tensorrt-at-all"])
def test_export_trt_without_tensorrt_writes_onnx_then_exits_2_with_one_line_naming_trt_rtx(digits_run, tmp_path, monkeypatch, rtx_installed):
    run = shutil.copytree(digits_run, tmp_path / "run")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    if not rtx_installed:
        monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    result = CliRunner().invoke(main, ["export", str(run), "--trt", "--n-check", "20"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith("error: ")
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "cannot build a TensorRT engine" in line and "pip install 'rapc[gpu]'" in line and "--trt-rtx" in line
    assert ("pip install tensorrt-rtx" in line) is not rtx_installed
    assert (run / "export" / "compressed.onnx").is_file() and (run / "export" / "fidelity.json").is_file()
    assert not list((run / "export").glob("*.engine"))  # no TensorRT-RTX engines in place of the ones asked for


def test_trt_and_trt_rtx_together_are_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path), "--trt", "--trt-rtx"])
    assert result.exit_code == 2 and "choose one" in result.stderr


def test_real_engines_build_from_fp32_fp16_and_int8_onnx(digits_run, tmp_path):
    run = shutil.copytree(digits_run, tmp_path / "run")
    result = export_run(run, precisions=("fp16", "int8"), n_check=64,
                        engines=EngineOptions(backend="tensorrt-rtx", max_batch=64, target="SM86"))
    engines = result.engines
    assert set(engines) == {"compressed.rtx-sm86.engine", "compressed.fp16.rtx-sm86.engine", "compressed.int8.rtx-sm86.engine"}
    for name, entry in engines.items():
        path = run / "export" / name
        assert path.stat().st_size == entry["bytes"] > 10_000
        assert not path.with_suffix(".timing.cache").exists()  # TensorRT-RTX has no build-time timing
        assert entry["backend"] == "tensorrt-rtx" and "not_run" in entry


def test_a_shrunk_resnet18_builds_into_an_engine(tmp_path):
    from rapc.config import PruningConfig, ShrinkConfig
    from rapc.pipeline.masks import MaskSet
    from rapc.pipeline.projection import Projector
    from rapc.pipeline.shrink import shrink

    torch.manual_seed(0)
    model = Architecture("resnet18", {"num_classes": 10, "in_channels": 3, "image_size": 32, "width": 4,
                                      "mean": [0.5] * 3, "std": [0.25] * 3}, [3, 32, 32]).build().eval()
    batch = torch.rand(4, 3, 32, 32)
    projector = Projector(model, batch, PruningConfig(scheme="filter", ratio=0.5))
    params = dict(model.named_parameters())
    MaskSet(model, projector.masks({n: params[n] for n in projector.targets}, params)).apply()
    path = export_onnx(shrink(model, batch, ShrinkConfig()).model, [3, 32, 32], tmp_path / "resnet.onnx")
    built = build_engine(EngineSpec(path, (3, 32, 32), max_batch=32, backend="tensorrt-rtx", target="SM86"))
    assert built.path.is_file() and built.bytes > 100_000


def test_an_unparseable_graph_names_the_file_and_the_parser_error(tmp_path):
    node = helper.make_node("NoSuchOp", ["input"], ["logits"], domain="rapc.test")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("rapc.test", 1)]), str(path))
    with pytest.raises(RapcError, match="TensorRT cannot parse bad.onnx"):
        build_engine(EngineSpec(path, (1, 8, 8), backend="tensorrt-rtx", target="SM86"))


@pytest.mark.gpu
def test_tensorrt_engine_runs_and_matches_onnxruntime_on_a_gpu(digits_run, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'rapc[gpu]')")
    from rapc.export.runners import OnnxRuntimeRunner

    run = shutil.copytree(digits_run, tmp_path / "run")
    result = export_run(run, n_check=64, engines=EngineOptions(backend="tensorrt", max_batch=64))
    (name,) = result.engines
    entry = result.engines[name]
    assert entry["clean"]["top1_agreement"] >= 0.99 and entry["clean"]["max_abs_diff"] < 1e-2
    images = np.random.rand(7, 1, 8, 8).astype(np.float32)
    assert (run / "export" / name).with_suffix(".timing.cache").is_file()
    runner = TensorRTRunner(run / "export" / name)
    np.testing.assert_allclose(runner.infer(images), OnnxRuntimeRunner(run / "export" / "compressed.onnx").infer(images), atol=1e-2)
