"""``rapc bench``: the run's dense and compressed models, and every file exported from them,
measured side by side: robust accuracy on PyTorch, the same adversarial images replayed
on each exported artifact, Square run through each artifact's runtime (deployed robust
accuracy), and latency per backend and batch size.

    runs/NAME/bench/bench.json   everything, machine and library versions included
    runs/NAME/bench/attacks/     the verdicts it judged itself (rapc.judgement), reused by a later bench
    runs/NAME/bench/report.md    the tables
    runs/NAME/bench/*.png        robust accuracy vs latency; kept channels per layer
"""

from __future__ import annotations

import copy
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from rapc.bench.backends import BACKENDS, Artifact
from rapc.bench.latency import Latency, TimingPolicy, build_backends, measure_backends
from rapc.bench.report import skipped_lines, write_report
from rapc.bench.robustness import bench_protocol, deployed, deployed_warnings, figure, replay_per_image
from rapc.config import describe
from rapc.data import load_data
from rapc.device import resolve_device
from rapc import judgement
from rapc.errors import RapcError
from rapc.export.artifacts import check_set
from rapc.export.runners import OnnxRuntimeRunner, Runner
from rapc.export.tensorrt import TensorRTRunner, cannot_run_engines
from rapc.modelio import WEIGHTS, load_model, read_architecture
from rapc.measure import compare_layers, layer_stats, summary
from rapc.judge import SQUARE_QUERIES, Protocol, Verdict, extend as extend_verdict, judge, replay_accuracy
from rapc.progress import Reporter, SilentReporter
from rapc.rundir import open_run, writable_dir



# Square's default share of the test images, modest: every image it cannot break costs square_queries
# passes of each file (the seconds per file are in the bench's log and bench.json).
N_SQUARE = 100


@dataclass(frozen=True)
class BenchOptions:
    backends: tuple[str, ...] = tuple(BACKENDS)
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    attacks: str = "quick"  # quick: clean, FGSM, PGD, ensemble (APGD-CE + APGD-T); full: also FAB-T and Square
    # The defaults are what compress judged (the run's eval.n_test and eval.n_ensemble), so that its
    # saved judgement is reused rather than attacked again.
    n_eval: int | None = None  # test images to judge; None: the run's eval.n_test (None there: all)
    n_ensemble: int | None = None  # the ensemble (and FAB-T, Square) on the first n of them; None: the run's eval.n_ensemble
    full_judgement: bool = False  # every test image, each under the ensemble: the figures to publish
    pgd: tuple[int, int] | None = None  # (steps, restarts) of the judge's PGD; None: the run's attack.eval
    # Square through each exported file's runtime on the first n test images (at most the ensemble's
    # n); None: not run. Each robust image costs `square_queries` forward passes of the file.
    n_square: int | None = N_SQUARE
    square_queries: int = SQUARE_QUERIES  # AutoAttack's reference; fewer is a weaker attack, and every label says so
    timing: TimingPolicy = field(default_factory=TimingPolicy)

    def __post_init__(self) -> None:
        if bad := [b for b in self.batch_sizes if b < 1]:
            raise RapcError(f"batch sizes must be at least 1, got {bad[0]}")
        if self.n_eval is not None and self.n_eval < 1:
            raise RapcError(f"n_eval must be at least 1, got {self.n_eval}")
        if self.n_ensemble is not None and self.n_ensemble < 1:
            raise RapcError(f"n_ensemble must be at least 1, got {self.n_ensemble}")
        if self.n_square is not None and self.n_square < 1:
            raise RapcError(f"n_square must be at least 1 (or skip Square), got {self.n_square}")
        if self.square_queries < 1:
            raise RapcError(f"Square needs at least 1 query, got {self.square_queries}")
        if self.full_judgement and (self.n_eval is not None or self.n_ensemble is not None):
            raise RapcError("the full judgement is every test image under the ensemble; give it without --n-eval and --n-ensemble")
        for name in self.backends:
            BACKENDS.get(name)  # an unknown name is a one-line error before anything runs


@dataclass(frozen=True)
class Exported:
    """An ONNX file of the run, and the engine built from it if any."""

    artifact: str  # dense, compressed, dense.fp16, compressed.int8, ...
    model: str  # dense or compressed
    precision: str
    onnx: Path
    engine: Path | None = None
    engine_note: str | None = None  # why the engine cannot run here; None when it can

    @property
    def runnable_engine(self) -> Path | None:
        return self.engine if self.engine_note is None else None


def exported_files(export: Path) -> list[Exported]:
    """The files ``rapc export`` wrote and checked, from its fidelity.json."""
    index = export / "fidelity.json"
    if not index.is_file():
        return []
    try:
        record = json.loads(index.read_text())
        files, engines = record["artifacts"], record.get("engines", {})
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RapcError(f"{index} is not a fidelity report of `rapc export`; export again") from None
    built = {e["onnx"]: (name, e) for name, e in engines.items() if (export / name).is_file()}
    found = []
    for filename, info in files.items():
        if not (export / filename).is_file():
            continue
        model = info["model"]
        artifact = model if info["precision"] == "fp32" else f"{model}.{info['precision']}"
        engine, note = None, None
        if filename in built:
            name, entry = built[filename]
            engine = export / name
            note = cannot_run_engines() if entry["backend"] == "tensorrt" else (
                f"a {entry['backend']} engine for {entry.get('target')} runs on that RTX-class GPU only")
        found.append(Exported(artifact, model, info["precision"], export / filename, engine, note))
    return found


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    versions = {}
    for package in ("torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "onnxruntime-gpu", "torchattacks",
                    "tensorrt", "tensorrt-rtx", "nvidia-modelopt", "rapc"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    info = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "versions": versions, "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class ReplayTarget(NamedTuple):
    item: Exported
    backend: str  # the bench backend that runs it: ort-cpu (ONNX files) or tensorrt (engines)
    runner: Runner | None
    note: str | None  # why it cannot run here


def _replay_targets(exported: list[Exported]) -> dict[str, ReplayTarget]:
    """A runner for every exported ONNX file (onnxruntime CPU) and runnable engine, opened up front:
    a corrupt file fails in seconds, not after the attacks."""
    targets: dict[str, ReplayTarget] = {}
    for item in exported:
        targets[item.onnx.name] = ReplayTarget(item, "ort-cpu", OnnxRuntimeRunner(item.onnx), None)
        if item.engine is not None:
            runner = TensorRTRunner(item.engine) if item.engine_note is None else None
            targets[item.engine.name] = ReplayTarget(item, "tensorrt", runner, item.engine_note)
    return targets


def _replays(targets: dict[str, ReplayTarget], robustness: dict[str, Verdict], labels: torch.Tensor,
             reporter: Reporter) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """Each target's accuracy on the adversarial images crafted on its PyTorch model, and the same per image."""
    results: dict[str, dict] = {}
    per_image: dict[str, dict[str, np.ndarray]] = {}
    for key, (item, backend, runner, note) in targets.items():
        entry: dict[str, Any] = {"artifact": item.artifact, "model": item.model, "precision": item.precision, "backend": backend}
        if runner is None:
            results[key] = entry | {"not_run": note}
            continue
        per_image[key] = replay_per_image(runner, robustness[item.model], labels)
        entry |= {"runtime": runner.name, "accuracy": replay_accuracy(per_image[key])}
        results[key] = entry
        reporter.log(f"replayed on {key}: clean {entry['accuracy']['clean']:.2%}, all attacks {entry['accuracy']['all']:.2%}")
    return results, per_image


def _deployed(targets: dict[str, ReplayTarget], robustness: dict[str, Verdict], replayed: dict[str, dict[str, np.ndarray]],
              images: torch.Tensor, labels: torch.Tensor, protocol: Protocol, options: BenchOptions,
              reporter: Reporter) -> dict[str, dict]:
    """Each runnable target's deployed robust accuracy: replay and Square through its runtime, worst case per image."""
    results: dict[str, dict] = {}
    for key, (item, backend, runner, note) in targets.items():
        entry: dict[str, Any] = {"artifact": item.artifact, "model": item.model, "precision": item.precision, "backend": backend}
        if runner is None:
            results[key] = entry | {"not_run": note}
            continue
        entry |= {"runtime": runner.runtime} | deployed(runner, key, item.precision, robustness[item.model], replayed[key], images,
                                                        labels, protocol, options.n_square, options.square_queries)
        results[key] = entry
        square = entry["square"]
        reporter.log(f"deployed on {key}: {entry['deployed']['accuracy']:.1%} (n={entry['n']})"
                     + (f"; {square['label']} {square['accuracy']:.1%} in {square['seconds']:.0f} s" if square else ""))
    return results


def _robustness(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol, n_classes: int,
                device: torch.device, weights: Path, compress_judgement: Path, cache: Path, extend: bool, reporter: Reporter,
                title: str) -> Verdict:
    """The judge's verdict on one model: a saved one (an earlier bench's in ``cache``, compress's in
    ``compress_judgement``) when it is what ``protocol`` asks of these weights and images, else what
    one lacks judged on top of it (with ``extend``), else judged afresh. What is judged is saved to
    ``cache``: the ensemble takes long on a CPU, and a later failure or Ctrl-C must not cost it again."""
    digest = judgement.file_digest(weights)
    saved = {"an earlier bench's": cache, "compress's": compress_judgement}
    found = [(whose, stored) for whose, path in saved.items()
             if (stored := judgement.load(path, images)) is not None and stored.covers(protocol, digest, images, labels)]
    on_device = copy.deepcopy(model).to(device)  # the CPU latency backends keep the original
    if whole := [(whose, stored) for whose, stored in found if stored.is_all_of(protocol, len(labels))]:
        whose, stored = whole[0]
        reporter.log(f"reused {whose} judgement of {title} ({stored.describe()})")
        return extend_verdict(stored.verdict, on_device, images, labels, protocol, n_classes, reporter, title)  # adds nothing
    if found and extend:
        whose, stored = found[0]
        reporter.log(f"{whose} judgement of {title} ({stored.describe()}) reused; judging only what it lacks")
        result = extend_verdict(stored.verdict, on_device, images, labels, protocol, n_classes, reporter, title)
    else:
        result = judge(on_device, images.to(device), labels.to(device), protocol, n_classes, reporter, title)
    judgement.save(cache, result, weights, labels, device)
    return result


def _artifacts(models: dict[str, torch.nn.Module], exported: list[Exported], input_shape: tuple[int, ...]) -> list[Artifact]:
    """The PyTorch models with their fp32 files, then the ONNX-only precision variants."""
    by_name = {e.artifact: e for e in exported}
    artifacts = []
    for name, model in models.items():
        e = by_name.get(name)
        artifacts.append(Artifact(name, model, input_shape, onnx=e.onnx if e else None, engine=e.runnable_engine if e else None))
    artifacts += [Artifact(e.artifact, None, input_shape, onnx=e.onnx, engine=e.runnable_engine) for e in exported if e.precision != "fp32"]
    return artifacts


def _robust_accuracy(latency: Latency, robustness: dict[str, Verdict], replays: dict[str, dict], artifacts: dict[str, Artifact]) -> float | None:
    """The worst-case robust accuracy of what this backend ran: PyTorch's, or the replay on its file."""
    runs = BACKENDS.get(latency.backend).runs
    if runs == "model":
        return robustness[latency.artifact].worst_case()
    path = getattr(artifacts[latency.artifact], runs)
    entry = replays.get(path.name, {})
    return entry["accuracy"]["all"] if "accuracy" in entry else None


def _deployed_figure(latency: Latency, artifacts: dict[str, Artifact], deployment: dict[str, dict],
                     robustness: dict[str, Verdict]) -> dict[str, Any] | None:
    """The robust accuracy of what this backend ran, for the plot: the deployed figure of its file
    measured on the same runtime; for PyTorch, the white-box worst case on the same images as the
    files' figures (all judged images when nothing was exported); None when not measured."""
    runs = BACKENDS.get(latency.backend).runs
    if runs == "model":
        same = [e["pytorch"] for e in deployment.values() if e["model"] == latency.artifact and "pytorch" in e]
        if same:
            return same[0]
        verdict = robustness[latency.artifact]
        return figure(verdict.worst_case_per_image(), verdict.worst_case_label())
    entry = deployment.get(getattr(artifacts[latency.artifact], runs).name, {})
    return entry["deployed"] if entry.get("backend") == latency.backend and "deployed" in entry else None


def speedups(latencies: list[Latency], models: dict[str, dict[str, Any]], artifacts: dict[str, str]) -> list[dict[str, Any]]:
    """Each artifact against the dense model on the same backend and batch, beside the MAC and parameter ratios.

    ``artifacts`` maps an artifact name to the model it comes from (dense or compressed).
    """
    dense = {(l.backend, l.batch): l for l in latencies if l.artifact == "dense"}
    rows = []
    for l in latencies:
        base = dense.get((l.backend, l.batch))
        if base is None or l.artifact == "dense":
            continue
        source = models[artifacts[l.artifact]]
        rows.append({
            "backend": l.backend, "batch": l.batch, "artifact": l.artifact,
            "dense_ms": base.mean_ms, "ms": l.mean_ms, "speedup": base.mean_ms / l.mean_ms,
            "mac_ratio": models["dense"]["macs"] / source["macs"], "param_ratio": models["dense"]["params"] / source["params"],
        })
    return rows


def bench_run(run: str | Path, options: BenchOptions = BenchOptions(), out: str | Path | None = None,
              reporter: Reporter | None = None) -> dict[str, Any]:
    """Measure the run; write bench.json, report.md and the plots to ``out`` (default RUN/bench)."""
    reporter = reporter or SilentReporter()
    paths = open_run(run)
    cfg = paths.config()
    run = paths.root
    directories = paths.models()
    for directory in directories.values():
        if not (directory / WEIGHTS).is_file():
            raise RapcError(f"{directory} holds no saved model; finish `rapc compress --out {run}` first")
    out = writable_dir(out or paths.bench)
    device = resolve_device(cfg.device)
    splits = load_data(cfg.data, cfg.seed)
    if options.full_judgement:
        n_eval, n_ensemble = None, None
    else:
        n_eval = options.n_eval if options.n_eval is not None else cfg.eval.n_test
        n_ensemble = options.n_ensemble if options.n_ensemble is not None else cfg.eval.n_ensemble
    images, labels = check_set(splits, n_eval)
    input_shape = tuple(read_architecture(paths.compressed).input_shape)
    models = {name: load_model(directory, allow_import=cfg.model.allow_import).eval() for name, directory in directories.items()}
    example = images[:2]

    exported = exported_files(paths.export)
    if not exported:
        reporter.log(f"note: no exported files; run `rapc export {run} --dense` to bench ONNX Runtime and TensorRT too")
    targets = _replay_targets(exported)
    artifacts = _artifacts(models, exported, input_shape)
    runnable, skipped = build_backends(list(options.backends), artifacts)
    if not runnable:
        reasons = "; ".join(skipped_lines(skipped))
        raise RapcError(f"none of the requested backends can run here: {reasons}; choose others with --backends")

    # The judge batches the images as compress's final judge did, so that PGD's random starts are its own.
    protocol = bench_protocol(cfg.attack.eval, options.attacks, options.pgd, n_ensemble, cfg.seed, cfg.data.eval_batch_size)
    robustness = {
        name: _robustness(model, images, labels, protocol, splits.info.num_classes, device, directories[name] / WEIGHTS,
                          paths.judgement(name), out / "attacks" / f"{name}.safetensors", not options.full_judgement, reporter, name)
        for name, model in models.items()
    }
    replays, replayed = _replays(targets, robustness, labels, reporter)
    deployment = _deployed(targets, robustness, replayed, images, labels, protocol, options, reporter)

    latencies = measure_backends(runnable, options.batch_sizes, options.timing, reporter)

    figures = {name: summary(model, example) | {"weights_bytes": (directories[name] / WEIGHTS).stat().st_size}
               for name, model in models.items()}
    by_artifact = {a.name: a for a in artifacts}
    source = {a.name: a.name.split(".")[0] for a in artifacts}
    warnings = [f"{name}: {w}" for name, r in robustness.items() for w in r.warnings]
    warnings += deployed_warnings(deployment)
    if noisy := sum(l.cv > options.timing.cv_warning for l in latencies):
        warnings.append(f"{noisy} of {len(latencies)} latency figures vary by more than {options.timing.cv_warning:.0%} "
                        "(coefficient of variation, marked ! in the latency table): a busy or throttling machine")
    report = {
        "run": str(run), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "data": cfg.data.name, "model": {"name": cfg.model.name, "width": cfg.model.width},
        "pruning": {"scheme": cfg.pruning.scheme, "ratio": cfg.pruning.ratio}, "compressed": describe(cfg),
        "judge": asdict(protocol), "n_eval": len(labels), "models": figures,
        "robustness": {name: r.to_dict() for name, r in robustness.items()},
        "worst_case_label": robustness["dense"].worst_case_label(),
        "replay": replays,
        "deployed": deployment,
        "exported": [{"artifact": e.artifact, "onnx": e.onnx.name, "bytes": e.onnx.stat().st_size,
                      "engine": e.engine.name if e.engine else None, "engine_note": e.engine_note} for e in exported],
        "timing": asdict(options.timing),
        "latency": [l.as_dict() | {"noisy": l.cv > options.timing.cv_warning,
                                   "robust_accuracy": _robust_accuracy(l, robustness, replays, by_artifact),
                                   "robust_attack": robustness[l.artifact.split(".")[0]].worst_case_label(),
                                   "deployed": _deployed_figure(l, by_artifact, deployment, robustness)} for l in latencies],
        "speedup": speedups(latencies, figures, source),
        "skipped": skipped,
        "layers": compare_layers(layer_stats(models["dense"], example), layer_stats(models["compressed"], example)),
        "warnings": warnings,
    }
    write_report(out, report)
    return report
