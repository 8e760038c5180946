"""Every model of a study measured the same way, whatever trained it.

Accuracy is measured in PyTorch on the test split: clean, the config's evaluation PGD, and
standard AutoAttack on the first n test images (``rapc bench``'s composition at reference
settings). Latency is measured for all models of the study together, interleaved per
backend and batch size as ``rapc bench`` does, so a speedup over the dense model is a
ratio from one run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from rapc.attacks import evaluate
from rapc.bench.backends import Artifact
from rapc.bench.latency import Latency, TimingPolicy, build_backends, measure_backends
from rapc.bench.robustness import autoattack
from rapc.config import Config
from rapc.data import head, load_data, loader
from rapc.export.onnx import export_onnx
from rapc.modelio import load_model, read_architecture
from rapc.pipeline.measure import summary
from rapc.progress import Reporter
from rapc.rundir import atomic_write

ONNX = "model.onnx"  # written beside the weights in each model directory, once


@dataclass(frozen=True)
class TestData:
    test: DataLoader
    images: torch.Tensor  # the test split's first images, for AutoAttack
    labels: torch.Tensor
    example: torch.Tensor  # a test batch for parameter and MAC counts
    n_classes: int

    @classmethod
    def make(cls, cfg: Config, n_autoattack: int) -> TestData:
        splits = load_data(cfg.data, cfg.seed)
        test = head(splits.test, cfg.eval.n_test)
        batch = next(iter(loader(test, max(n_autoattack, 64), shuffle=False)))
        return cls(loader(test, cfg.data.eval_batch_size, shuffle=False), batch[0][:n_autoattack], batch[1][:n_autoattack],
                   batch[0][:64], splits.info.num_classes)


def accuracy(model_dir: Path, cfg: Config, data: TestData, device: torch.device) -> dict[str, Any]:
    """Size and clean/PGD accuracy of the saved model in ``model_dir``."""
    model = load_model(model_dir, allow_import=cfg.model.allow_import).to(device)
    return summary(model, data.example.to(device)) | evaluate(model, data.test, cfg.attack.eval, device)


def autoattack_accuracy(model_dir: Path, cfg: Config, data: TestData, device: torch.device, reporter: Reporter, title: str) -> dict[str, Any]:
    model = load_model(model_dir, allow_import=cfg.model.allow_import).to(device)
    result = autoattack(model, data.images.to(device), data.labels.to(device), eps=cfg.attack.eval.eps,
                        n_classes=data.n_classes, seed=cfg.seed, reporter=reporter, title=title)
    return {"n": len(data.labels), "accuracy": result.accuracy, "broken_by": result.details}


def _onnx(model_dir: Path, allow_import: bool) -> Path:
    path = model_dir / ONNX
    if not path.is_file():
        model = load_model(model_dir, allow_import=allow_import)
        atomic_write(path, lambda tmp: export_onnx(model, read_architecture(model_dir).input_shape, tmp))
    return path


def latency(models: Mapping[str, Path], backends: Sequence[str], batch_sizes: Sequence[int], policy: TimingPolicy,
            allow_import: bool, reporter: Reporter) -> tuple[list[Latency], dict[str, str]]:
    """Every model on every backend that can run here, per batch size; and why the others were skipped."""
    artifacts = []
    reporter.begin("study: ONNX files", len(models))
    for label, directory in models.items():
        artifacts.append(Artifact(label, load_model(directory, allow_import=allow_import),
                                  tuple(read_architecture(directory).input_shape), onnx=_onnx(directory, allow_import)))
        reporter.advance()
    reporter.end(f"study: {len(models)} models exported to ONNX")
    runnable, skipped = build_backends(list(backends), artifacts)
    return measure_backends(runnable, batch_sizes, policy, reporter), skipped
