"""Every model of a study measured the same way, whatever trained it.

Accuracy is the judge's (rapc.judge) final protocol on the test split, in PyTorch: clean,
FGSM, the judge's PGD (the config's attack.eval steps, step 2.5*eps/steps unless set, at least
2 restarts) and the ensemble APGD-CE + APGD-T at reference settings on the first n test images,
worst case per image with PGD; the same protocol compress and bench report. Latency is measured for all models of the study together, interleaved per
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

from rapc.bench.backends import Artifact
from rapc.bench.latency import Latency, TimingPolicy, build_backends, measure_backends
from rapc.config import Config
from rapc.data import load_data
from rapc.device import resolve_device
from rapc.export.onnx import export_onnx
from rapc.judge import Protocol, final_protocol, judge_loader
from rapc.modelio import load_model, read_architecture
from rapc.pipeline.trainer import test_loader
from rapc.measure import summary
from rapc.progress import Reporter
from rapc.rundir import atomic_write

ONNX = "model.onnx"  # written beside the weights in each model directory, once


@dataclass(frozen=True)
class TestData:
    test: DataLoader  # the test split (its first cfg.eval.n_test images), unshuffled: the judge's images
    example: torch.Tensor  # a test batch for parameter and MAC counts
    n_classes: int

    @classmethod
    def make(cls, cfg: Config) -> TestData:
        splits = load_data(cfg.data, cfg.seed)
        test = test_loader(cfg, splits, resolve_device(cfg.device))
        return cls(test, next(iter(test))[0][:64], splits.info.num_classes)


def protocol(cfg: Config, n_ensemble: int | None) -> Protocol:
    """The judge's final protocol for a study model: ``cfg.attack.eval``, the ensemble on the first
    ``n_ensemble`` test images (None: all)."""
    return final_protocol(cfg.attack.eval, n_ensemble=n_ensemble, seed=cfg.seed)


def size(model_dir: Path, cfg: Config, data: TestData) -> dict[str, Any]:
    """Parameters, MACs and sparsity of the saved model in ``model_dir``."""
    return summary(load_model(model_dir, allow_import=cfg.model.allow_import), data.example)


def judged(model_dir: Path, cfg: Config, data: TestData, protocol: Protocol, device: torch.device, reporter: Reporter,
           title: str) -> dict[str, Any]:
    """The judge's verdict on the saved model in ``model_dir`` as JSON: every figure with its label, n and standard error."""
    model = load_model(model_dir, allow_import=cfg.model.allow_import).to(device)
    return judge_loader(model, data.test, protocol, device, data.n_classes, reporter, title).to_dict()


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
