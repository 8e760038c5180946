"""The verdict on a trained run: both saved models judged on the test split, beside what
training recorded, written as ``summary.json``.

Kept apart from training so that a finished run can be judged again (``rapc report``, e.g.
the ensemble on more images) without retraining, and so that the study, which judges every
row itself, trains a pipeline row without judging it twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from rapc import judge, judgement
from rapc.config import Config, updated
from rapc.data import load_data
from rapc.device import resolve_device
from rapc.errors import RapcError
from rapc.measure import summary
from rapc.modelio import WEIGHTS, load_model
from rapc.pipeline.admm import unconverged
from rapc.pipeline.budget import budget_report, saved_allocation
from rapc.pipeline.trainer import test_loader
from rapc.progress import Reporter, SilentReporter
from rapc.results import ModelResult
from rapc.rundir import RunDir, open_run


@dataclass(frozen=True)
class Trained:
    """What training knows and the judge does not: written with the models as ``trained.json``."""

    layers: list[dict[str, Any]]  # per layer, the masked model beside the shrunk one (measure.compare_layers)
    shrink: dict[str, Any]  # channels removed, max abs diff of the shrink, zeros the shrink could not remove
    notes: list[str]
    baseline: str  # what the dense model is

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "shrink": self.shrink, "notes": self.notes, "baseline": self.baseline}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trained:
        """From trained.json, or from the summary.json of a run finished before trained.json existed."""
        return cls(data["layers"], data["shrink"], data["notes"], data["baseline"])


@dataclass
class Summary:
    """A finished run's result, as summary.json holds it."""

    run: Path
    dense: ModelResult
    compressed: ModelResult
    trained: Trained
    warnings: list[str]  # an unconverged ADMM's, then the judge's gradient-masking warnings
    budget: dict[str, Any] | None = None  # with pruning.target: target vs achieved (budget_report)
    seconds: dict[str, float] | None = None  # where the time went (_seconds); None in a summary from before it
    start_check: dict[str, Any] | None = None  # the start model's verdict (stages.check_start)
    finished_before: bool = field(default=False, compare=False)  # re-read, not judged in this call

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.trained.layers

    @property
    def notes(self) -> list[str]:
        return self.trained.notes

    @property
    def baseline(self) -> str:
        return self.trained.baseline

    def to_json(self) -> dict[str, Any]:
        return {"dense": self.dense.to_json(), "compressed": self.compressed.to_json(), **self.trained.to_json(), "warnings": self.warnings,
                "budget": self.budget, "seconds": self.seconds, "start_check": self.start_check}

    @classmethod
    def from_json(cls, run: Path, data: dict[str, Any], finished_before: bool = False) -> Summary:
        what = str(run / "summary.json")
        return cls(run, ModelResult.from_json(data["dense"], what), ModelResult.from_json(data["compressed"], what), Trained.from_json(data),
                   data["warnings"], data.get("budget"), data.get("seconds"), data.get("start_check"), finished_before)


def finished(out: str | Path) -> Summary | None:
    """The summary of a run judged before, or None."""
    data = open_run(out).summary()
    return None if data is None else Summary.from_json(Path(out), data, finished_before=True)


def report(out: str | Path, reporter: Reporter | None = None, n_ensemble: int | None = None) -> Summary:
    """Judge the trained run in ``out`` (the ensemble on its first ``n_ensemble`` test images; None:
    the run's eval.n_ensemble) and write its summary.json.

    A model's saved judgement is reused when it is exactly what is asked (a run interrupted while
    judging keeps what it had judged); anything else is judged afresh and saved in its place.
    """
    reporter = reporter or SilentReporter()
    run = RunDir(open_run(out).root)
    saved = run.trained() or run.summary()  # a run finished before trained.json existed: its summary holds the same
    if saved is None:
        raise RapcError(f"{out} has not finished training; `rapc compress --resume {out}` finishes it")
    cfg = run.config()
    if n_ensemble is not None:
        cfg = updated(cfg, "--n-ensemble", eval={"n_ensemble": n_ensemble})
    device = resolve_device(cfg.device)
    test = test_loader(cfg, load_data(cfg.data, cfg.seed), device)
    images, labels = (torch.cat(parts) for parts in zip(*test))  # what a saved verdict is checked against
    example = images[:64].to(device)
    figures, seconds = {}, 0.0
    for name, directory in run.models().items():
        model = load_model(directory, allow_import=cfg.model.allow_import).to(device)
        verdict, judged_in = _verdict(model, name, run, test, images, labels, cfg, reporter)
        seconds += judged_in
        figures[name] = ModelResult(**summary(model, example), file_bytes=(directory / WEIGHTS).stat().st_size, judge=verdict.result())
    records = run.records()
    warnings = [f"{name}: {w}" for name, f in figures.items() for w in f.judge.warnings]
    if warning := admm_warning(records):
        warnings.insert(0, f"compressed: {warning}")
    allocation = saved_allocation(run)
    result = Summary(
        run.root, figures["dense"], figures["compressed"], Trained.from_json(saved), warnings,
        budget_report(allocation, figures["dense"], figures["compressed"]) if allocation is not None else None,
        _seconds(records, seconds), run.start_check_figures())
    run.write_summary(result.to_json())
    return result


def _verdict(model: nn.Module, name: str, run: RunDir, test: DataLoader, images: torch.Tensor, labels: torch.Tensor,
             cfg: Config, reporter: Reporter) -> tuple[judge.Verdict, float]:
    """The judge's final figures on the test split (clean, FGSM, PGD and the ensemble, each with its
    label, n and standard error) and the seconds they took to judge.

    The verdict per image, with its adversarial images, is saved beside the run's models
    (``RunPaths.judgement``), so that bench replays it rather than attacking again; a saved one
    stands in with the seconds its attacks took. The protocol records the loader's batch size:
    PGD draws its random starts per batch."""
    protocol = judge.final_protocol(cfg.attack.eval, n_ensemble=cfg.eval.n_ensemble, seed=cfg.seed, batch=test.batch_size)
    weights = run.models()[name] / WEIGHTS
    saved = judgement.load(run.judgement(name), images)
    if saved is not None and saved.covers(protocol, judgement.file_digest(weights), images, labels) and saved.is_all_of(protocol, len(labels)):
        reporter.log(f"{name}: reused the judgement this run saved before ({saved.describe()})")
        return saved.verdict, sum(r.seconds for r in saved.verdict.results)
    start = time.perf_counter()
    verdict = judge.judge_loader(model, test, protocol, reporter=reporter, title=name, keep_images=True)
    judgement.save(run.judgement(name), verdict, weights, labels, next(model.parameters()).device)
    return verdict, time.perf_counter() - start


def admm_warning(records: list[dict[str, Any]]) -> str | None:
    """unconverged() on the run's log, so that a resumed run (its hard prune logged before) still says it."""
    admm = [r for r in records if r["stage"] == "admm" and "val_robust" in r]  # its last epoch is validated
    pruned = [r for r in records if r["stage"] == "hard_prune"]
    return unconverged(admm[-1], pruned[-1]) if admm and pruned else None


def _seconds(records: list[dict[str, Any]], judging: float) -> dict[str, float]:
    """Where the run's time went: each stage's epochs (training and selection) as metrics.jsonl
    logged them, so the epochs of an interrupted run count too (an epoch resumed from inside
    counts from its resume), the dense control's two stages as one, and the final judge of
    both models (a saved verdict's own seconds where it was reused). Setup (data, the start
    check, an allocation) and the shrink are not counted."""
    stages: dict[str, float] = {}
    for record in records:
        if "epoch" in record and "seconds" in record:
            stage = "dense control" if record["stage"].startswith("dense-") else record["stage"]
            stages[stage] = stages.get(stage, 0.0) + record["seconds"]
    return stages | {"final judge": judging}
