"""The command line: parse, validate, call one library function, print."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from rapc.bench.backends import BACKENDS
from rapc.bench.run import BenchOptions
from rapc.config import DEFAULT_PRESET, TARGET_METRICS, WEIGHTS_SUFFIXES, ConfigWarning, describe, load_config, presets
from rapc.errors import RapcError
from rapc.export.precision import PRECISIONS
from rapc.export.tensorrt import DEFAULT_RTX_TARGET, RTX_TARGETS
from rapc.schemes import SCHEMES
from rapc.progress import RichReporter, log_console
from rapc.rundir import RunPaths
from rapc.study import ROWS, StudyOptions

if TYPE_CHECKING:
    from rapc.pipeline.report import Summary
    from rapc.results import ModelResult

# Help texts read the registries and the study's defaults: a newly registered scheme, backend or
# study row is listed by --help without an edit here.
STUDY_DEFAULTS = StudyOptions()
BENCH_DEFAULTS = BenchOptions()


class RapcGroup(click.Group):
    """Turns user mistakes (RapcError, and click's own bad options) into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RapcError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else ctx.command_path
            click.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # compress says how to resume; other commands have nothing to resume
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=RapcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rapc")
def main() -> None:
    """rapc: robust, small, fast CNNs. Adversarial ADMM pruning (Ye et al., ICCV 2019),
    physical shrinking with torch-pruning, and deployment checks."""
    warnings.showwarning = _show_warning


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A config warning is about the user's input: one `warning:` line, not Python's file:line form."""
    if issubclass(category, ConfigWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def _stdout() -> Console:
    """Tables on stdout; piped into a file or a log they keep their columns instead of wrapping at 80,
    and a line of prose stays one line, however long a path in it."""
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.soft_wrap = not console.is_terminal
    return console


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _table(dense: ModelResult, compressed: ModelResult, eps: float) -> Table:
    """Dense beside compressed: size, then every figure of the judge with its attack, n and standard error."""
    table = Table(title="dense vs compressed (test split)")
    table.add_column("")
    for name in ("dense", "compressed", "ratio"):
        table.add_column(name, justify="right")
    clean = (dense.judge.clean, compressed.judge.clean)
    rows = [
        ("params", f"{dense.params:,}", f"{compressed.params:,}", _ratio(dense.params, compressed.params)),
        ("MACs", f"{dense.macs:,}", f"{compressed.macs:,}", _ratio(dense.macs, compressed.macs)),
        ("file", f"{dense.file_bytes / 1024:.0f} KiB", f"{compressed.file_bytes / 1024:.0f} KiB", _ratio(dense.file_bytes, compressed.file_bytes)),
        (f"clean acc (n={clean[0].n})", f"{clean[0].accuracy:.2%}", f"{clean[1].accuracy:.2%}", ""),
        *((f"{d.label} (eps {eps:g}, n={d.n})", f"{d.accuracy:.2%} ± {d.stderr:.1%}", f"{c.accuracy:.2%} ± {c.stderr:.1%}", "")
          for d, c in zip(dense.judge.attacks[1:], compressed.judge.attacks[1:])),
        ("zero weights", f"{dense.sparsity:.1%}", f"{compressed.sparsity:.1%}", ""),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def _layer_table(layers: list[dict]) -> Table:
    table = Table(title="per layer: masked -> shrunk")
    for name in ("layer", "weight shape", "MACs", "zeros"):
        table.add_column(name, justify="left" if name == "layer" else "right")
    for layer in layers:
        shape = "x".join(map(str, layer["shape_before"]))
        if layer["shape_after"] != layer["shape_before"]:
            shape += " -> " + "x".join(map(str, layer["shape_after"]))
        table.add_row(
            layer["name"], shape,
            f"{layer['macs_before']:,} -> {layer['macs_after']:,}",
            f"{layer['sparsity_before']:.0%} -> {layer['sparsity_after']:.0%}",
        )
    return table


@main.command()
@click.option("--config", "-c", default=None, metavar="FILE|PRESET",
              help=f"YAML config file or preset name (default {DEFAULT_PRESET}; presets: {', '.join(presets())}).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one config value, e.g. --set pruning.ratio=0.75 --set stages.admm.epochs=10 (repeatable).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Run directory (default runs/<preset or config name>); it must not hold a run yet.")
@click.option("--resume", "resume_run", type=click.Path(file_okay=False), default=None, metavar="RUN",
              help="Continue the interrupted run RUN from its last checkpoint, with its own config.yaml "
                   "(a finished run is only re-reported).")
@click.option("--weights", default=None, metavar="FILE",
              help="Start from your own trained model: a .safetensors file or a state dict (.pt/.pth, read with "
                   "torch.load(weights_only=True)) of the model the config builds (model.name; your own "
                   "'package.module:factory' with model.allow_import=true). Sets stages.start_from=FILE and "
                   "stages.pretrain.epochs=0 before the --set overrides, so --set stages.pretrain.epochs=3 first "
                   "trains it adversarially for 3 epochs. The model is judged before pruning and refused if it is not "
                   "robust (see --force); the dense baseline is then the given model.")
@click.option("--force", is_flag=True,
              help="Prune the start model (--weights or stages.start_from) even if it is not robust at the configured eps "
                   "(stages.check_start=false).")
@click.option("--target", default=None, metavar="METRIC=FRACTION",
              help="A whole-model budget instead of the per-layer pruning.ratio: macs=0.5, params=0.25 or latency=0.5 keeps "
                   "that fraction of the dense model's cost (pruning.target.METRIC).")
@click.option("--backend", default=None, metavar="NAME",
              help=f"The bench backend a latency target is measured on (pruning.target.backend); known: {', '.join(BACKENDS)}.")
@click.option("--batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="The batch size a latency target is measured at (pruning.target.batch).")
def compress(config: str | None, overrides: tuple[str, ...], out: str | None, resume_run: str | None, weights: str | None,
             force: bool, target: str | None, backend: str | None, batch: int | None) -> None:
    """Adversarial ADMM pruning -> hard prune -> masked adversarial retraining -> physical shrink.

    Writes the run directory: resolved config.yaml, metrics.jsonl, stage checkpoints,
    pretrained/, dense/ (the baseline: budget-matched, or the model given by --weights) and compressed/ (architecture JSON + safetensors), summary.json. Ctrl-C (or SIGTERM)
    stops after the current step with a checkpoint (under torchrun a few steps later, all ranks
    at the same one); --resume continues from it, under torchrun too.
    """
    from rapc.bench.latency import latency_cost
    from rapc.pipeline.compress import compress as run_compress, resume
    from rapc.pipeline.distributed import env_rank, rapc_command
    from rapc.rundir import open_run

    if resume_run is not None:
        if config or overrides or out or weights or force or target or backend or batch:
            raise RapcError("--resume continues a run with its own config.yaml and directory; drop --config, --set and --out "
                            "(and --weights, --force, --target, --backend, --batch)")
        cfg, out = open_run(resume_run).config(), resume_run
    else:
        flags = _start_and_budget(weights, force, target)
        cfg = load_config(config, (*flags, *overrides))
        if backend is not None or batch is not None:
            if cfg.pruning.target is None or cfg.pruning.target.metric != "latency":
                raise RapcError("--backend and --batch say where a latency target is measured; give one with --target latency=F")
            cfg = load_config(config, (*flags, *_latency_measurement(backend, batch), *overrides))
        out = out or str(Path("runs") / Path(config or DEFAULT_PRESET).stem)
    if cfg.pruning.target is not None and cfg.pruning.target.metric == "latency":  # an unknown backend fails now, not after pretraining
        try:
            BACKENDS.get(cfg.pruning.target.backend)
        except RapcError as exc:
            raise RapcError(f"pruning.target.backend: {exc}") from None
    console = log_console(quiet=env_rank() != 0)  # the other ranks of a torchrun: rank 0 reports
    console.print(f"rapc compress{' (resumed)' if resume_run else ''}: {describe(cfg)} -> {out}", markup=False)
    try:
        with RichReporter(console) as reporter:
            result = resume(out, reporter, latency_cost) if resume_run else run_compress(cfg, out, reporter, latency_cost)
    except KeyboardInterrupt:  # under torchrun every rank stops at the same step; rank 0 says how to go on
        if env_rank() == 0:
            click.echo(f"interrupted: `{rapc_command(f'compress --resume {out}')}` continues from the last checkpoint", err=True)
        sys.exit(130)
    if result is None:
        return
    if result.finished_before:
        console.print(f"{out} had already finished; nothing to do. Its results:")
    _print_summary(result, cfg.attack.eval.eps)


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--n-ensemble", type=click.IntRange(min=1), default=None, metavar="N",
              help="The ensemble APGD-CE + APGD-T on the first N test images (default: the run's eval.n_ensemble). "
                   "Publishing a figure? Give every test image (eval.n_test of the run's config).")
def report(run: str, n_ensemble: int | None) -> None:
    """Judge a trained run again and rewrite its summary.json, without retraining.

    Both saved models (dense and compressed) get the judge's final figures on the test split:
    clean, FGSM, PGD and the ensemble, worst case per image. A saved verdict is reused when it is
    exactly what is asked; anything else is judged afresh and replaces it (bench then reuses it).
    """
    from rapc.pipeline.report import report as judge_run
    from rapc.rundir import open_run

    cfg = open_run(run).config()
    console = log_console()
    console.print(f"rapc report: {run}" + (f" (the ensemble on {n_ensemble} test images)" if n_ensemble else ""), markup=False)
    with RichReporter(console) as reporter:
        result = judge_run(run, reporter, n_ensemble)
    _print_summary(result, cfg.attack.eval.eps)


def _print_summary(result: Summary, eps: float) -> None:
    """A run's result: per-layer shapes, dense beside compressed, what the dense model is, the budget, notes, time, warnings."""
    out_console = _stdout()
    out_console.print(_layer_table(result.layers))
    out_console.print(_table(result.dense, result.compressed, eps))
    out_console.print(f"dense: {result.baseline}", markup=False)
    if result.budget is not None:
        b = result.budget
        out_console.print(f"budget: {b['achieved']:.3f} of the dense model's {b['metric']} kept (target {b['target']:.3f}; "
                          f"{b['method']} allocation, measured {b['measured']}; per layer: "
                          f"{RunPaths(result.run).allocation / 'allocation.md'})", markup=False)
        if b["reason"]:
            out_console.print(f"warning: {b['reason']}", style="yellow", markup=False)
    for note in result.notes:
        out_console.print(f"note: {note}", markup=False)
    if result.seconds:
        parts = " · ".join(f"{stage} {seconds:.0f} s" for stage, seconds in result.seconds.items())
        out_console.print(f"time: {parts} ({sum(result.seconds.values()) / 60:.1f} min in all)", markup=False)
    for warning in result.warnings:
        out_console.print(f"warning: {warning}", style="yellow", markup=False)
    click.echo(f"run directory: {result.run}")


def _start_and_budget(weights: str | None, force: bool, target: str | None) -> list[str]:
    """compress's --weights, --force and --target options as config overrides, applied before --set's."""
    overrides = []
    if weights is not None:
        path = Path(weights)
        if path.suffix.lower() not in WEIGHTS_SUFFIXES:
            raise RapcError(f"--weights {weights}: expected a {', '.join(WEIGHTS_SUFFIXES)} file; a rapc run or model directory "
                            f"goes in --set stages.start_from=DIR")
        if not path.is_file():
            raise RapcError(f"--weights {weights}: {'not a file' if path.exists() else 'no such file'}")
        overrides += [f"stages.start_from={_yaml_string(weights)}", "stages.pretrain.epochs=0"]
    if force:
        overrides.append("stages.check_start=false")
    if target is not None:
        metric, sep, value = target.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = None
        if not sep or metric not in TARGET_METRICS or fraction is None or not 0 < fraction < 1:
            raise RapcError(f"--target {target}: expected METRIC=FRACTION with METRIC one of {', '.join(TARGET_METRICS)} and "
                            f"FRACTION in (0, 1), the share of the dense model's cost kept, e.g. macs=0.5")
        overrides += [f"pruning.target.{m}={fraction if m == metric else 'null'}" for m in TARGET_METRICS]
    return overrides


def _latency_measurement(backend: str | None, batch: int | None) -> list[str]:
    """--backend and --batch as config overrides."""
    overrides = []
    if backend is not None:
        if backend not in BACKENDS:
            raise RapcError(f"--backend {backend}: unknown; known: {', '.join(BACKENDS)}")
        overrides.append(f"pruning.target.backend={_yaml_string(backend)}")
    if batch is not None:
        overrides.append(f"pruning.target.batch={batch}")
    return overrides


def _yaml_string(text: str) -> str:
    """A value that --set's YAML parsing reads back as this exact string (a path may look like a number or hold ': ')."""
    return json.dumps(text)


def _export_table(result) -> Table:
    folder = result.files[0].parent if result.files else ""
    attack = f"{result.attack['label']}, n={result.attack['n']}" if result.attack else "PGD"
    table = Table(title=f"exported to {folder} (fidelity on clean / {attack} test images)")
    for name in ("file", "MB", "checked against", "max abs diff", "top-1 agreement", "accuracy"):
        table.add_column(name, justify="left" if name in ("file", "checked against") else "right")
    for path in result.files:
        f = result.fidelity[path.name]
        worst = max(f["clean"]["max_abs_diff"], f["adversarial"]["max_abs_diff"])
        table.add_row(
            path.name, f"{path.stat().st_size / 1e6:.1f}", f["reference"].split(":")[0], f"{worst:.1e}",
            f"{f['clean']['top1_agreement']:.1%} / {f['adversarial']['top1_agreement']:.1%}",
            f"{f['clean']['accuracy']:.1%} / {f['adversarial']['accuracy']:.1%}",
        )
    for name, e in result.engines.items():
        if "adversarial" in e:
            figures = (f"{max(e['clean']['max_abs_diff'], e['adversarial']['max_abs_diff']):.1e}",
                       f"{e['clean']['top1_agreement']:.1%} / {e['adversarial']['top1_agreement']:.1%}",
                       f"{e['clean']['accuracy']:.1%} / {e['adversarial']['accuracy']:.1%}")
        else:
            figures = ("not run", e["not_run"], "")
        table.add_row(name, f"{e['bytes'] / 1e6:.1f}", e["onnx"], *figures)
    return table


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--dense", is_flag=True, help="Also export the run's dense robust model (export/dense.onnx), for side-by-side benches.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(PRECISIONS), default=("fp32",), show_default=True,
              help="Also write fp16 (model.fp16.onnx) or int8 Q/DQ (model.int8.onnx, calibrated on training images); repeatable.")
@click.option("--n-check", type=click.IntRange(min=1), default=512, show_default=True,
              help="Test images (and as many PGD examples) on which every file is checked.")
@click.option("--trt", is_flag=True,
              help="Build a TensorRT engine from every ONNX file (needs `pip install 'rapc[gpu]'` and a CUDA GPU; "
                   "without them: an error after the ONNX files are written).")
@click.option("--trt-rtx", is_flag=True, help="Build TensorRT-RTX engines instead (for RTX GPUs; no GPU needed to build) for --rtx-target.")
@click.option("--rtx-target", default=DEFAULT_RTX_TARGET, show_default=True, type=click.Choice(RTX_TARGETS),
              help="Compute capability of TensorRT-RTX engines.")
@click.option("--max-batch", type=click.IntRange(min=1), default=256, show_default=True,
              help="Largest batch of the engines' optimization profile (1..max, tuned for min(64, max)).")
@click.option("--sparse", is_flag=True, help="Allow 2:4 sparse tactics (useful where the weights are 2:4, scheme nm).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Output directory (default RUN/export).")
def export(run: str, dense: bool, precisions: tuple[str, ...], n_check: int, trt: bool, trt_rtx: bool,
           rtx_target: str, max_batch: int, sparse: bool, out: str | None) -> None:
    """Export a run's compressed model to ONNX (RUN/export/compressed.onnx) and prove it faithful.

    One self-contained file, dynamic batch, input `input` in [0,1] pixel space. onnxruntime
    is run against PyTorch on clean test images and on PGD examples crafted on the PyTorch
    model; a max abs logit difference above 1e-4 fails the command. fp16 and int8 files are
    compared with the fp32 one on the same inputs (top-1 agreement, clean and robust
    accuracy). With --trt or --trt-rtx each ONNX file is also built into an engine
    (RUN/export/*.engine, timing cache beside it). Results go to RUN/export/fidelity.json.
    """
    from rapc.export.artifacts import EngineOptions, export_run

    if trt and trt_rtx:
        raise click.UsageError("--trt and --trt-rtx build engines for different GPUs; choose one")
    with RichReporter(log_console()) as reporter:
        engines = EngineOptions("tensorrt-rtx" if trt_rtx else "tensorrt", max_batch, sparse, rtx_target) if trt or trt_rtx else None
        result = export_run(run, dense=dense, precisions=precisions, n_check=n_check, engines=engines, out=out, reporter=reporter)
    _stdout().print(_export_table(result))


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _pgd(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    steps, _, restarts = value.partition("x")
    if not (steps.isdigit() and restarts.isdigit() and int(steps) > 0 and int(restarts) > 0):
        raise click.BadParameter(f"expected STEPSxRESTARTS such as 50x5, got {value!r}")
    return int(steps), int(restarts)


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--backends", default=None, metavar="NAMES",
              help="Comma-separated latency backends (default: all; those that cannot run here are listed as skipped). "
                   f"Known: {', '.join(BACKENDS)}.")
@click.option("--batch-sizes", default="1,8,64,256", show_default=True, callback=_int_list, help="Comma-separated batch sizes for latency.")
@click.option("--attacks", type=click.Choice(["quick", "full"]), default="quick", show_default=True,
              help="quick: clean, FGSM, PGD and the ensemble APGD-CE + APGD-T (100 steps, 9 targets), worst case per image. "
                   "full: also FAB-T and Square 5000 (the standard AutoAttack).")
@click.option("--n-eval", type=click.IntRange(min=1), default=None,
              help="Test images to attack (default: the run's eval.n_test, the images compress judged, so that its saved "
                   "judgement is reused rather than attacked again).")
@click.option("--n-ensemble", "--n-autoattack", "n_ensemble", type=click.IntRange(min=1), default=None,
              help="The ensemble (and FAB-T, Square) on the first N of them (default: the run's eval.n_ensemble, as compress "
                   "judged; it is slow on CPU). The report gives n and the standard error.")
@click.option("--full-judgement", is_flag=True,
              help="Every test image, each under the ensemble: the figures to publish (slow on CPU). A saved judgement is "
                   "reused only if it is exactly that; not with --n-eval or --n-ensemble.")
@click.option("--pgd", default=None, callback=_pgd, metavar="STEPSxRESTARTS",
              help="The judge's PGD, at step 2.5*eps/steps (default: the run's attack.eval steps, at least 2 restarts).")
@click.option("--n-square", type=click.IntRange(min=1), default=BENCH_DEFAULTS.n_square, show_default=True,
              help="Square (black-box, through each exported file's runtime) on the first N test images, at most the "
                   "ensemble's; each robust image costs --square-queries passes of the file. The deployed robust accuracy "
                   "is the worst case per image of it and the replay.")
@click.option("--square-queries", type=click.IntRange(min=1), default=BENCH_DEFAULTS.square_queries, show_default=True,
              help="Square's query budget per image (AutoAttack's reference); fewer is a weaker attack, named in every label.")
@click.option("--no-square", is_flag=True, help="Skip Square: the deployed figure is then the replay's alone.")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Minimum timed seconds per batch size.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Output directory (default RUN/bench).")
def bench(run: str, backends: str | None, batch_sizes: tuple[int, ...], attacks: str, n_eval: int | None, n_ensemble: int | None,
          full_judgement: bool, pgd: tuple[int, int] | None, n_square: int, square_queries: int, no_square: bool,
          min_seconds: float, out: str | None) -> None:
    """Latency and robust accuracy of a run's dense and compressed models, side by side.

    Attacks run on the PyTorch models (fp32); their adversarial images are replayed on every
    file `rapc export` wrote (ONNX fp32/fp16/int8, TensorRT engines), and Square attacks each
    file through its runtime: deployed robust accuracy. Latency is timed per
    backend and batch size, dense and compressed interleaved in one process. Writes
    RUN/bench/bench.json, report.md, robust_vs_latency.png and layers.png.

    compress's final judgement is reused when the weights, test images and attacks are the
    same (the defaults); asked for more images or attacks, only what it lacks is judged.
    """
    from rapc.bench.latency import TimingPolicy
    from rapc.bench.report import skipped_lines, tables
    from rapc.bench.run import bench_run

    options = BenchOptions(
        backends=tuple(backends.split(",")) if backends else tuple(BACKENDS), batch_sizes=batch_sizes, attacks=attacks,
        n_eval=n_eval, n_ensemble=n_ensemble, full_judgement=full_judgement, pgd=pgd, n_square=None if no_square else n_square,
        square_queries=square_queries, timing=TimingPolicy(min_seconds=min_seconds),
    )
    with RichReporter(log_console()) as reporter:
        report = bench_run(run, options, out, reporter)
    console = _stdout()
    for table in tables(report):
        if not table.title.startswith("Latency"):  # the full latency table is in report.md
            console.print(table.rich())
    for line in skipped_lines(report["skipped"]):
        console.print(f"skipped {line}", style="dim", markup=False)
    for warning in report["warnings"]:
        console.print(f"warning: {warning}", style="yellow", markup=False)
    click.echo(f"report: {Path(out or RunPaths(run).bench) / 'report.md'}")


def _float_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@main.command()
@click.option("--config", "-c", default=None, metavar="FILE|PRESET",
              help=f"YAML config file or preset name (default {DEFAULT_PRESET}); its pruning scheme and ratio are set per cell.")
@click.option("--ratios", default="2,4", show_default=True, callback=_float_list,
              help="Comma-separated per-layer factors: 4 keeps a quarter of each layer (pruning.ratio 0.75); "
                   "filter pruning then removes about 16x of the parameters, shown as 'fewer' in the table.")
@click.option("--schemes", default=",".join(STUDY_DEFAULTS.schemes), show_default=True,
              help=f"Comma-separated pruning schemes; known: {', '.join(SCHEMES)}.")
@click.option("--rows", default=None,
              help="Comma-separated rows (default all): "
                   + ", ".join(f"{name} ({ROWS.info(name).get('summary', 'see rapc/study/rows.py')})" for name in ROWS) + ".")
@click.option("--seeds", type=click.IntRange(min=1), default=STUDY_DEFAULTS.seeds, show_default=True,
              help="Train every shared dense model and every row N times, with the config's seed, seed + 1, ...; the table "
                   "gives each figure's mean and standard deviation across them (each seed's figures are in study.json). "
                   "Seeds can run in parallel: '--set seed=1' in another process on the same --out trains seed 1 alone, "
                   "and a last '--seeds N' call gathers the finished seeds.")
@click.option("--n-ensemble", "--n-autoattack", "n_ensemble", type=click.IntRange(min=1), default=STUDY_DEFAULTS.n_ensemble,
              help="The judge's ensemble APGD-CE + APGD-T (100 steps, 9 targets) on the first N test images of every model "
                   f"(default {STUDY_DEFAULTS.n_ensemble or 'all'}; it is slow on CPU). The table gives n and the standard error.")
@click.option("--backends", default=None,
              help=f"Comma-separated latency backends (default {','.join(STUDY_DEFAULTS.backends)}; those that cannot run here are "
                   f"listed as skipped). Known: {', '.join(BACKENDS)}.")
@click.option("--batch-sizes", default=None, callback=_int_list,
              help=f"Comma-separated latency batch sizes (default {','.join(map(str, STUDY_DEFAULTS.batch_sizes))}).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one config value (repeatable).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Study directory (default runs/study-<config name>).")
def study(config: str | None, ratios: tuple[float, ...], schemes: str, rows: str | None, seeds: int, n_ensemble: int | None,
          backends: str | None, batch_sizes: tuple[int, ...] | None, overrides: tuple[str, ...], out: str | None) -> None:
    """rapc's pipeline beside four baselines, for every compression ratio and scheme, in one table.

    Three dense models (robust, natural, and robust trained on for the pruning stages'
    epochs: budget-matched) are trained once and shared; every row trains through the
    config's pretrain, ADMM and retraining recipes, so all end on the same schedule and
    full-eps epochs. Each row lives in OUT/seed<s>/r<ratio>-<scheme>/<row>/ and a finished
    row is not rerun. Writes OUT/study.json, OUT/study.md and OUT/study.png (robust
    accuracy vs MACs).
    """
    from rapc.bench.report import skipped_lines
    from rapc.study import StudyOptions, study as run_study
    from rapc.study.report import table

    cfg = load_config(config, overrides)
    given = {"rows": rows and tuple(rows.split(",")), "backends": backends and tuple(backends.split(",")), "batch_sizes": batch_sizes}
    options = StudyOptions(ratios, tuple(schemes.split(",")), n_ensemble=n_ensemble, seeds=seeds,
                           **{k: v for k, v in given.items() if v is not None})
    out = out or str(Path("runs") / f"study-{Path(config or DEFAULT_PRESET).stem}")
    console = log_console()
    with RichReporter(console) as reporter:
        result = run_study(cfg, out, options, reporter)
    _stdout().print(table(result.report).rich())
    for line in skipped_lines(result.report["skipped"]):
        console.print(f"skipped {line}", style="dim", markup=False)
    click.echo(f"report: {result.out / 'study.md'}")


if __name__ == "__main__":
    main()
