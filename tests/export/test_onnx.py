import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import rapc.export.artifacts as artifacts
from rapc.errors import RapcError
from rapc.export.artifacts import export_run
from rapc.export.onnx import INPUT, export_onnx
from rapc.export.runners import OnnxRuntimeRunner, TorchRunner
from rapc.modelio import load_model
from rapc.rundir import open_run


@pytest.fixture(scope="module")
def exported(digits_run):
    return export_run(digits_run, dense=True, n_check=200)


def test_export_writes_one_self_contained_file_per_model(digits_run, exported):
    files = sorted(p.name for p in (digits_run / "export").iterdir())
    assert files == ["compressed.onnx", "dense.onnx", "fidelity.json"]  # no external .onnx.data
    graph = onnx.load(str(exported.files[0]))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version >= 17
    assert [i.name for i in graph.graph.input] == [INPUT]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnxruntime_runs_every_batch_size_and_matches_pytorch(digits_run, exported, batch):
    model = load_model(digits_run / "compressed")
    images = torch.rand(batch, 1, 8, 8).numpy()
    np.testing.assert_allclose(OnnxRuntimeRunner(exported.files[0]).infer(images), TorchRunner(model).infer(images), atol=1e-5)


def test_fidelity_report_covers_clean_and_adversarial_inputs(digits_run, exported):
    report = json.loads((digits_run / "export" / "fidelity.json").read_text())
    summary = json.loads((digits_run / "summary.json").read_text())
    for name in ("compressed.onnx", "dense.onnx"):
        entry = report["artifacts"][name]
        assert entry["passed"] and entry["precision"] == "fp32"
        for kind in ("clean", "adversarial"):
            assert entry[kind]["n"] == 200 and entry[kind]["max_abs_diff"] <= 1e-4 and entry[kind]["top1_agreement"] == 1.0
        # The PGD examples really attack: accuracy on them is far below clean accuracy.
        assert entry["adversarial"]["accuracy"] < entry["clean"]["accuracy"] - 0.1
    assert report["artifacts"]["compressed.onnx"]["clean"]["accuracy"] == pytest.approx(summary["compressed"]["clean"], abs=0.06)


def test_fidelity_report_names_the_judges_pgd_that_crafted_the_adversarial_inputs(digits_run, exported):
    report = json.loads((digits_run / "export" / "fidelity.json").read_text())
    protocol = artifacts.check_protocol(open_run(digits_run).config())
    assert report["attack"]["label"] == protocol.pgd_label and report["attack"]["label"].startswith("PGD-")
    assert report["attack"]["n"] == 200 and report["attack"]["protocol"]["restarts"] >= 2
    assert exported.attack["label"] == protocol.pgd_label


def test_an_unfaithful_export_fails_loudly_and_is_recorded(digits_run, tmp_path, monkeypatch):
    run = Path(shutil.copytree(digits_run, tmp_path / "run"))
    real_export = artifacts.export_onnx

    def export_another_model(model, input_shape, path):
        other = load_model(digits_run / "compressed")
        with torch.no_grad():
            other.fc2.bias.add_(0.01)  # a small drift, as a broken exporter or runtime would cause
        return real_export(other, input_shape, path)

    monkeypatch.setattr(artifacts, "export_onnx", export_another_model)
    with pytest.raises(RapcError, match="fidelity check failed for compressed.onnx"):
        export_run(run, n_check=50)
    report = json.loads((run / "export" / "fidelity.json").read_text())
    assert report["artifacts"]["compressed.onnx"]["passed"] is False
    assert report["artifacts"]["compressed.onnx"]["clean"]["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)


def test_batch_one_examples_do_not_freeze_the_batch_dimension(digits_run, tmp_path):
    path = export_onnx(load_model(digits_run / "compressed"), [1, 8, 8], tmp_path / "m.onnx")
    assert OnnxRuntimeRunner(path).infer(np.random.rand(5, 1, 8, 8).astype(np.float32)).shape == (5, 10)


def test_corrupt_onnx_and_non_run_directories_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(RapcError, match="onnxruntime cannot load it"):
        OnnxRuntimeRunner(bad)
    with pytest.raises(RapcError, match="not a run directory"):
        export_run(tmp_path)


def test_export_command_prints_the_files_and_fails_cleanly_on_a_non_run(digits_run, tmp_path):
    from click.testing import CliRunner

    from rapc.cli import main

    run = shutil.copytree(digits_run, tmp_path / "run")
    result = CliRunner().invoke(main, ["export", str(run), "--n-check", "20"])
    assert result.exit_code == 0 and "compressed.onnx" in result.stdout
    result = CliRunner().invoke(main, ["export", str(tmp_path / "run" / "export")])
    assert result.exit_code == 2 and result.stderr.startswith("error:") and "not a run directory" in result.stderr
    help_text = CliRunner().invoke(main, ["export", "--help"]).stdout
    assert "--dense" in help_text and "--n-check" in help_text and "fidelity.json" in help_text


def _shrunk(name: str, width: int):
    from rapc.config import PruningConfig, ShrinkConfig
    from rapc.modelio import Architecture
    from rapc.pipeline.masks import MaskSet
    from rapc.pipeline.projection import Projector
    from rapc.pipeline.shrink import shrink

    torch.manual_seed(0)
    model = Architecture(name, {"num_classes": 10, "in_channels": 3, "image_size": 32, "width": width,
                                "mean": [0.5] * 3, "std": [0.25] * 3}, [3, 32, 32]).build().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.3, 0.3)
    batch = torch.rand(4, 3, 32, 32)
    projector = Projector(model, batch, PruningConfig(scheme="filter", ratio=0.5))
    params = dict(model.named_parameters())
    MaskSet(model, projector.masks({n: params[n] for n in projector.targets}, params)).apply()
    return shrink(model, batch, ShrinkConfig()).model


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn"])
def test_shrunk_cifar_models_export_with_a_dynamic_batch_and_match_pytorch(name, tmp_path):
    model = _shrunk(name, width=2)
    path = export_onnx(model, [3, 32, 32], tmp_path / f"{name}.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops  # folded into the convolutions
    if name == "resnet18":
        assert "Add" in ops  # the residual adds survive the shrink
    runner, reference = OnnxRuntimeRunner(path), TorchRunner(model)
    for batch in (1, 7, 64):
        images = torch.rand(batch, 3, 32, 32).numpy()
        np.testing.assert_allclose(runner.infer(images), reference.infer(images), atol=1e-4, rtol=1e-4)


def test_out_option_writes_elsewhere_and_a_run_without_model_is_an_error(digits_run, tmp_path):
    run = Path(shutil.copytree(digits_run, tmp_path / "run"))
    result = export_run(run, n_check=20, out=tmp_path / "elsewhere")
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["compressed.onnx", "fidelity.json"]
    assert result.files == [tmp_path / "elsewhere" / "compressed.onnx"]
    shutil.rmtree(run / "compressed")
    with pytest.raises(RapcError, match=r"run/compressed does not exist"):
        export_run(run, n_check=20)


def _weights_by_op(path: Path) -> dict[str, list[tuple[int, ...]]]:
    """Shapes of the initializers each Conv, Gemm and MatMul node reads, by op type."""
    graph = onnx.load(str(path)).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    found: dict[str, list[tuple[int, ...]]] = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            found.setdefault(node.op_type, []).extend(shapes[i] for i in node.input if i in shapes and len(shapes[i]) > 1)
    return found


@pytest.mark.parametrize("name, width, size, channels", [("lenet", 8, 28, 1), ("resnet18", 4, 16, 3)])
def test_pruning_round_to_reaches_the_exported_files_conv_and_gemm_shapes(name, width, size, channels, tmp_path):
    """A multiple of 8 channels chosen by the projection survives the shrink, BatchNorm folding and the export."""
    from rapc.config import PruningConfig, ShrinkConfig
    from rapc.models import create_model
    from rapc.pipeline.masks import hard_prune
    from rapc.pipeline.projection import Projector
    from rapc.pipeline.shrink import shrink

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=channels, image_size=size, width=width,
                         mean=[0.5] * channels, std=[0.25] * channels).eval()
    batch = torch.rand(4, channels, size, size)
    hard_prune(model, Projector(model, batch, PruningConfig(scheme="filter", ratio=0.7, round_to=8)))
    shrunk = shrink(model, batch, ShrinkConfig()).model
    path = export_onnx(shrunk, [channels, size, size], tmp_path / f"{name}.onnx")
    found = _weights_by_op(path)
    convs = found["Conv"]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in shrunk.modules())
    for out, inputs, *_ in convs:
        assert out % 8 == 0 and (inputs % 8 == 0 or inputs == channels), convs
    fully_connected = sorted(tuple(sorted(s)) for s in found.get("Gemm", []) + found.get("MatMul", []))
    if name == "lenet":  # conv1 16 -> 8 (ratio alone: 5), conv2 32 -> 16 (10), fc1 512 -> 160 (154); fc2 keeps its 10 classes
        assert sorted(convs) == [(8, 1, 5, 5), (16, 8, 5, 5)]
        assert fully_connected == [(10, 160), (160, 16 * 7 * 7)]
    else:
        assert all(min(s) == 10 and max(s) % 8 == 0 for s in fully_connected), fully_connected
    images = torch.rand(3, channels, size, size).numpy()
    np.testing.assert_allclose(OnnxRuntimeRunner(path).infer(images), TorchRunner(shrunk).infer(images), atol=1e-4, rtol=1e-4)

