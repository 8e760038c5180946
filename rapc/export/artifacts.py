"""``rapc export``: the run's models as ONNX files, each proven faithful before it is trusted.

    runs/NAME/export/compressed.onnx the compressed (shrunk) model
    runs/NAME/export/dense.onnx      the dense robust model (--dense), for side-by-side benches
    runs/NAME/export/fidelity.json   onnxruntime vs PyTorch, clean and adversarial
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rapc.config import Config
from rapc.data import Splits, first, head, load_data, loader
from rapc.errors import RapcError
from rapc.export.fidelity import Agreement, compare
from rapc.export.onnx import export_onnx
from rapc.export.precision import make_variant
from rapc.export.tensorrt import EngineSpec, TensorRTRunner, build_engine, check_can_build, gpu_present
from rapc.export.runners import OnnxRuntimeRunner, Runner, TorchRunner
from rapc.judge import Protocol, judge, selection_protocol
from rapc.modelio import load_model, read_architecture
from rapc.progress import Reporter, SilentReporter
from rapc.rundir import atomic_write, open_run, writable_dir

FP32_TOLERANCE = 1e-4  # max abs logit difference; float32 re-association stays orders of magnitude below


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    fidelity: dict[str, dict[str, Any]] = field(default_factory=dict)  # by file name
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # by engine file name
    attack: dict[str, Any] = field(default_factory=dict)  # the judge's PGD that crafted the adversarial inputs: label, n, protocol


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "tensorrt"  # tensorrt (--trt) or tensorrt-rtx (--trt-rtx); never one for the other
    max_batch: int = 256
    sparse: bool = False
    target: str | None = None  # TensorRT-RTX compute capability


def check_set(splits: Splits, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test images and labels of the run's dataset."""
    return first(splits.test, n)


def check_protocol(cfg: Config) -> Protocol:
    """The judge's PGD for the run's ``attack.eval`` (its selection level: clean and PGD), the PGD
    that compress, bench and study name with the same label."""
    return selection_protocol(cfg.attack.eval, seed=cfg.seed)


def adversarial(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol) -> tuple[torch.Tensor, dict[str, Any]]:
    """The judge's PGD examples crafted on the PyTorch model (float32, eval mode): per image the one
    that fooled it, else the last restart's; and the attack's label and n for the report."""
    pgd = judge(model, images, labels, protocol)["pgd"]
    return pgd.images, {"name": pgd.name, "label": pgd.label, "n": pgd.n}


def calibration_set(splits: Splits, n: int) -> np.ndarray:
    """The first n training images, for int8 activation ranges (never test images)."""
    return torch.cat([x for x, _ in loader(head(splits.train, n), 512, shuffle=False)]).numpy()


def _check(reference: Runner, candidate: Runner, images: torch.Tensor, attacked: torch.Tensor, labels: torch.Tensor) -> dict[str, Agreement]:
    return {
        "clean": compare(reference, candidate, images.numpy(), labels.numpy()),
        "adversarial": compare(reference, candidate, attacked.numpy(), labels.numpy()),
    }


def export_run(
    run: str | Path,
    *,
    dense: bool = False,
    precisions: tuple[str, ...] = ("fp32",),
    n_check: int = 512,
    n_calibration: int = 256,
    engines: EngineOptions | None = None,
    out: str | Path | None = None,
    reporter: Reporter | None = None,
) -> ExportResult:
    """Export the run's model (and dense model) to ONNX in each precision and check every file.

    fp32 is compared with PyTorch and must match to FP32_TOLERANCE. Lower precisions are
    compared with the fp32 file: their top-1 agreement and accuracy on the same clean and
    PGD inputs (the judge's PGD, named by its label in fidelity.json) are reported, so a user sees whether quantization changed robustness.
    With ``engines``, every ONNX file is then built into a TensorRT engine; the ONNX files
    and their fidelity report are written first, so they survive a missing TensorRT.
    Files go to ``out`` (default RUN/export).
    """
    reporter = reporter or SilentReporter()
    paths = open_run(run)
    cfg = paths.config()
    out = writable_dir(out or paths.export)
    splits = load_data(cfg.data, cfg.seed)
    images, labels = check_set(splits, n_check)
    calibration = calibration_set(splits, n_calibration) if "int8" in precisions else np.empty(0)
    targets = {"compressed": paths.compressed} | ({"dense": paths.dense} if dense else {})
    protocol = check_protocol(cfg)
    result = ExportResult()
    attacked_by_model: dict[str, torch.Tensor] = {}
    for name, directory in targets.items():
        model = load_model(directory, allow_import=cfg.model.allow_import)
        reporter.log(f"{name}: exporting to ONNX")
        fp32 = export_onnx(model, read_architecture(directory).input_shape, out / f"{name}.onnx")
        attacked, attack = adversarial(model, images, labels, protocol)
        attacked_by_model[name] = attacked
        result.attack = attack | {"protocol": asdict(protocol), "config": cfg.attack.eval.model_dump()}
        fp32_runner = OnnxRuntimeRunner(fp32)
        for precision in ("fp32", *(p for p in precisions if p != "fp32")):
            path = make_variant(fp32, precision, calibration)
            runner = fp32_runner if precision == "fp32" else OnnxRuntimeRunner(path)
            reference = TorchRunner(model) if precision == "fp32" else fp32_runner
            checks = _check(reference, runner, images, attacked, labels)
            worst = max(c.max_abs_diff for c in checks.values())
            entry: dict[str, Any] = {"model": name, "precision": precision, "runtime": runner.name, "reference": reference.name}
            if precision == "fp32":
                entry |= {"tolerance": FP32_TOLERANCE, "passed": worst <= FP32_TOLERANCE}
            result.fidelity[path.name] = entry | {k: v.as_dict() for k, v in checks.items()}
            result.files.append(path)
            reporter.log(
                f"{path.name}: vs {reference.name.split(':')[0]} on {len(images)} clean + {attack['n']} {attack['label']} images: "
                f"max abs diff {worst:.2e}, top-1 agreement {checks['clean'].top1_agreement:.2%} / "
                f"{checks['adversarial'].top1_agreement:.2%}, accuracy {checks['clean'].accuracy:.2%} / {checks['adversarial'].accuracy:.2%}"
            )
    write_report(out, result)
    failed = [n for n, f in result.fidelity.items() if f.get("passed") is False]
    if failed:
        raise RapcError(f"fidelity check failed for {', '.join(failed)}: onnxruntime differs from PyTorch by more than {FP32_TOLERANCE:g} (see {out / 'fidelity.json'})")
    if engines is not None:
        build_engines(result, engines, images, attacked_by_model, labels, reporter)
        write_report(out, result)
    return result


def write_report(out: Path, result: ExportResult) -> None:
    report = {"attack": result.attack, "artifacts": result.fidelity, "engines": result.engines}
    atomic_write(out / "fidelity.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1)))


def build_engines(
    result: ExportResult, options: EngineOptions, images: torch.Tensor, attacked: dict[str, torch.Tensor],
    labels: torch.Tensor, reporter: Reporter,
) -> None:
    """Build an engine from every ONNX file; run it against that file where the engine can run here."""
    backend = options.backend
    check_can_build(backend)
    runnable = backend == "tensorrt" and gpu_present()
    for path in result.files:
        info = result.fidelity[path.name]
        spec = EngineSpec(path, tuple(images.shape[1:]), options.max_batch, backend, options.target, options.sparse)
        built = build_engine(spec)
        entry: dict[str, Any] = {"onnx": path.name, "backend": backend, "version": built.version, "target": options.target,
                                 "sparse": options.sparse, "build_seconds": built.seconds, "bytes": built.bytes,
                                 "max_batch": options.max_batch}
        if runnable:
            checks = _check(OnnxRuntimeRunner(path), TensorRTRunner(built.path, backend), images, attacked[info["model"]], labels)
            entry |= {k: v.as_dict() for k, v in checks.items()}
        else:
            entry["not_run"] = "RTX target" if backend == "tensorrt-rtx" else "no CUDA GPU"
        result.engines[built.path.name] = entry
        reporter.log(f"{built.path.name}: {backend} {built.version}, {built.bytes / 1e6:.1f} MB in {built.seconds:.1f}s"
                     + ("" if runnable else f" (not run: {entry['not_run']})"))
