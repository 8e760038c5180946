"""Robust accuracy against wall-clock time for rapc's whole pipeline under several training recipes
(issue 11, item 5), to choose the default preset: the recipe and epochs that give the compressed
model the highest ensemble accuracy within the default's time budget.

What is measured: for every recipe (a named list of config overrides on top of ``--config``, the
table ``RECIPES`` below), every budget multiplier (each stage's epochs, clean epochs and eps
ramp scaled by it, rounded, at least 1) and every seed (``--seeds N``: seeds 0..N-1, which seed
the weights, the shuffle, the training attacks and the judge's random starts), one
``compress()`` run in its own directory ``OUT/<recipe>-x<multiplier>-s<seed>/``. One run is one point:

- seconds: the pipeline's training time as compress() records it in its summary (``seconds``):
  every epoch of pretraining, ADMM and masked retraining with its validation, wall-clock; the
  final judging is excluded (timed apart, as judge_seconds in point.json), and so are the few
  seconds of data loading, hard prune, shrink and saving;
- the compressed model's MAC ratio (dense / compressed) and its clean, PGD and ensemble (PGD +
  APGD-CE + APGD-T) accuracy under rapc's judge (``judge.final_protocol`` of the config's
  ``attack.eval``), with each attack's label, n and standard error, all on the first ``--n`` test
  images: the same images for every figure and every point.

Every run sets ``stages.dense_control=false``: the benchmark compares compressed models, and the
dense control would double the training time. compress()'s own judging runs its ensemble on one
image; the script judges the compressed model itself on all ``--n``, as compress() would with
``eval.n_ensemble=N``, so the dense model's ensemble, which nothing here uses, costs no time.

The table has one row per recipe and budget: the mean over its seeds, with the spread across
seeds (std) when there are several, else the judge's standard error. A row is eligible with at
least ``--min-mac-ratio`` (3.8) times fewer MACs than the dense model and a mean clean accuracy
of at least ``--min-clean`` (95%); the pick is the eligible row with the highest mean ensemble
accuracy within ``--time-budget`` mean seconds (``preset``: the preset recipe's own seconds at
x1, + 20% for timing noise: the default's time budget on this machine with these threads). A
last line gives, per recipe, the fewest seconds in which its mean reached the preset x1's mean
ensemble accuracy, and the ratio to the preset's seconds.

Points are the unit of work, run budget by budget: a finished point keeps its ``point.json`` and
is never run again; an interrupted one continues from its last checkpoint
(``rapc.pipeline.compress.resume``), its seconds the epochs metrics.jsonl kept, each counted once. So a long measurement can run in the background, be stopped and be started again
with the same command; ``--finished-only`` tables the points finished so far and trains nothing.

    .venv/bin/python benchmarks/time_to_robustness.py --threads 1
    .venv/bin/python benchmarks/time_to_robustness.py --recipes preset,paper --multipliers 1,2 --n 200
    .venv/bin/python benchmarks/time_to_robustness.py --recipes preset,carry-1,free-2 --multipliers 0.5,1 --seeds 3 --n 300

Output: a Markdown table (printed, and OUT/table.md), the pick in one line with its overrides,
and OUT/time_to_robustness.png (ensemble accuracy vs seconds, one curve per recipe).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rapc import judge
from rapc.config import DEFAULT_PRESET, Config, StageConfig, load_config, validate
from rapc.data import load_data
from rapc.device import resolve_device
from rapc.errors import RapcError
from rapc.modelio import load_model
from rapc.pipeline.compress import compress, resume
from rapc.pipeline.report import Summary
from rapc.pipeline.trainer import test_loader
from rapc.progress import Reporter, RichReporter, log_console
from rapc.rundir import RunPaths, atomic_write
from rapc.tables import Table


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    overrides: tuple[str, ...]  # on top of --config and --set; the budget's epochs come after them

    def settings(self, cfg: Config) -> list[str]:
        """The overrides, with ``{eps}`` fields (the training attack's eps of ``cfg``) filled in."""
        eps = cfg.attack.train.eps
        return [o.format(eps_2=f"{eps / 2:g}", eps_4=f"{eps / 4:g}") for o in self.overrides]


TRAINED_STAGES = ("pretrain", "admm", "retrain")


def _every_stage(*settings: str) -> tuple[str, ...]:
    return tuple(f"stages.{stage}.{setting}" for stage in TRAINED_STAGES for setting in settings)


# The recipes compared, the reference first and the costliest last (a partial run has the cheap ones); adding
# one is one entry. Each keeps the config's eval attack (the judge), data and model.
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("preset", "the config as it is", ()),
    Recipe("fgsm-rs", "FGSM with a random start, step 1.25*eps, with the catastrophic-overfitting guard",
           ("attack.train.method=fgsm", "attack.train.step=null", "attack.train.random_start=true",
            "attack.train.guard.enabled=true")),
    Recipe("pgd-decay", "the config's PGD-k with a cosine learning-rate schedule in every stage",
           _every_stage("schedule={name: cosine}")),
    Recipe("paper", "the paper's MNIST recipe: PGD-40 step 0.01, SGD lr 0.01 (momentum 0.9, constant) in every stage, "
           "ADMM rho 1e-3 x1.3 every epoch; the config's clean and ramp epochs",
           ("attack.train.method=pgd", "attack.train.steps=40", "attack.train.step=0.01",
            *_every_stage("optimizer={name: sgd, lr: 0.01, momentum: 0.9}", "schedule={name: constant}"),
            "admm.rho=0.001", "admm.rho_multiplier=1.3", "admm.update_every=1", "admm.update_unit=epoch")),
    Recipe("carry-1", "PGD-1 of step eps/2 from each example's perturbation of its last visit (attack.train.carry, ATTA): "
           "2 passes a batch where PGD-5 takes 6", ("attack.train.carry=true", "attack.train.steps=1", "attack.train.step={eps_2}")),
    Recipe("carry-1-val200", "carry-1, selecting the best epoch on 200 of the validation images (eval.n_val=200): "
           "selection's PGD-20x2 costs 41 passes an image, more than carry-1's training on the small split",
           ("attack.train.carry=true", "attack.train.steps=1", "attack.train.step={eps_2}", "eval.n_val=200")),
    Recipe("carry-2", "PGD-2 of step eps/4 from each example's carried perturbation (ATTA)",
           ("attack.train.carry=true", "attack.train.steps=2", "attack.train.step={eps_4}")),
    Recipe("free-2", "free adversarial training: each batch replayed twice, one backward pass for weights and perturbation, "
           "step eps, the perturbation carried per example", ("attack.train.method=free", "attack.train.steps=2",
                                                              "attack.train.step=null", "attack.train.carry=true")),
)}

PRESET_BUDGET = "preset"  # --time-budget preset: the seconds of the preset recipe at x1,
PRESET_SLACK = 1.2  # plus 20%, so that a recipe with the same epochs is not ruled out by timing noise (12% seen on digits)
POINT = "point.json"  # a finished point: everything the table needs
progress = log_console()


# --- the points -------------------------------------------------------------------------------


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def scaled_epochs(stage: StageConfig, multiplier: float) -> tuple[int, int, int]:
    """(epochs, clean epochs, eps-ramp epochs) of ``stage`` at ``multiplier`` times its budget.

    Each is rounded, and one the stage has stays at least 1; when the stage trains at full eps in
    some epoch, so does the scaled one (the ramp, then the clean epochs give way).
    """
    if stage.epochs == 0:
        return 0, stage.clean_epochs, stage.eps_ramp_epochs
    epochs = max(1, _half_up(stage.epochs * multiplier))
    clean, ramp = (max(1, _half_up(n * multiplier)) if n else 0 for n in (stage.clean_epochs, stage.eps_ramp_epochs))
    room = epochs - 1 if stage.clean_epochs + stage.eps_ramp_epochs < stage.epochs else epochs
    ramp = max(0, min(ramp, room - clean))
    clean = min(clean, room - ramp)
    return epochs, clean, ramp


def budget_overrides(cfg: Config, multiplier: float) -> list[str]:
    overrides = []
    for name in TRAINED_STAGES:
        epochs, clean, ramp = scaled_epochs(getattr(cfg.stages, name), multiplier)
        overrides += [f"stages.{name}.epochs={epochs}", f"stages.{name}.clean_epochs={clean}", f"stages.{name}.eps_ramp_epochs={ramp}"]
    return overrides


def fixed_overrides(n: int) -> list[str]:
    """Every point: no dense control (see the docstring); compress()'s own judging on the first n test images,
    with its ensemble on one image only: the benchmark judges the compressed model itself (``judge_compressed``),
    so that the dense model's ensemble, which it does not use, costs no time (rapc has no switch to skip it)."""
    return ["stages.dense_control=false", f"eval.n_test={n}", "eval.n_ensemble=1"]


@dataclass(frozen=True)
class Point:
    recipe: Recipe
    multiplier: float
    config: Config
    overrides: tuple[str, ...]  # the recipe's and the budget's, that differ from --config with --set
    directory: Path

    @property
    def name(self) -> str:
        return f"{self.recipe.name}-x{self.multiplier:g}-s{self.config.seed}"

    @classmethod
    def make(cls, recipe: Recipe, multiplier: float, seed: int, args: argparse.Namespace) -> Point:
        base = load_config(args.config, args.set)
        settings = recipe.settings(base)
        with_recipe = [*args.set, *settings]
        budget = budget_overrides(load_config(args.config, with_recipe), multiplier)
        cfg = load_config(args.config, [*with_recipe, *budget, *fixed_overrides(args.n), f"seed={seed}"])
        changed = tuple(o for o in [*settings, *budget] if _differs(base, cfg, o))
        return cls(recipe, multiplier, cfg, changed, args.out / f"{recipe.name}-x{multiplier:g}-s{seed}")

    @property
    def epochs(self) -> str:
        return "+".join(str(getattr(self.config.stages, s).epochs) for s in TRAINED_STAGES)


def _differs(base: Config, cfg: Config, override: str) -> bool:
    """Whether ``override`` left its key in ``cfg`` other than in ``base``."""
    key = override.partition("=")[0]
    return _lookup(cfg.model_dump(mode="json"), key) != _lookup(base.model_dump(mode="json"), key)


def _lookup(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def run_point(point: Point, reporter: Reporter) -> tuple[Summary, float, bool]:
    """compress() the point, or continue its interrupted run: (result, training seconds, resumed)."""
    run = RunPaths(point.directory)
    resumed = run.config_path.is_file()
    if resumed and run.config() != point.config:
        raise RapcError(f"{point.directory} holds a run of another config (other --set, --n or recipe); "
                        f"delete it or choose another --out")
    result = resume(point.directory, reporter) if resumed else compress(point.config, point.directory, reporter)
    if result.seconds is None:
        raise RapcError(f"{point.directory} finished under a rapc that did not record its time; delete it to measure it again")
    return result, sum(seconds for stage, seconds in result.seconds.items() if stage != "final judge"), resumed


def _attack(verdict: dict[str, Any], name: str) -> dict[str, Any]:
    (attack,) = [a for a in verdict["attacks"] if a["name"] == name]
    return {k: attack[k] for k in ("label", "n", "accuracy", "stderr")}


_warm: set[str] = set()


def warm_up(cfg: Config) -> None:
    """Pay the process's one-time costs untimed, or whichever point runs first would: the first
    dataset load imports its reader (scikit-learn's: 3 s) and the first optimizer torch._dynamo (3 s)."""
    if cfg.data.name not in _warm:
        importlib.import_module("torch._dynamo")
        load_data(cfg.data, cfg.seed)
        _warm.add(cfg.data.name)


def judge_compressed(point: Point, reporter: Reporter) -> dict[str, Any]:
    """The judge's final figures for the point's compressed model on the first n test images: what
    compress() reports for it with eval.n_ensemble=n (the same loader, protocol and seed)."""
    cfg = point.config
    device = resolve_device(cfg.device)
    model = load_model(RunPaths(point.directory).compressed).to(device)
    test = test_loader(cfg, load_data(cfg.data, cfg.seed), device)
    protocol = judge.final_protocol(cfg.attack.eval, n_ensemble=cfg.eval.n_test, seed=cfg.seed)
    return judge.judge_loader(model, test, protocol, reporter=reporter, title=f"{point.name} compressed").to_dict()


def measure(point: Point, reporter: Reporter) -> dict[str, Any]:
    """The point's figures, from its point.json if it has one, else from its (continued) run."""
    path = point.directory / POINT
    if path.is_file():
        cached = json.loads(path.read_text())
        if validate(cached["config"], str(path)) != point.config:
            raise RapcError(f"{path} was measured with another config (other --set, --n or recipe); "
                            f"delete {point.directory} or choose another --out")
        progress.print(f"{point.name}: finished before, {cached['seconds']:.0f} s; reused", markup=False)
        return cached
    warm_up(point.config)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result, seconds, resumed = run_point(point, reporter)
    judged = time.perf_counter()
    progress.print(f"{point.name}: judging the compressed model on the first {point.config.eval.n_test} test images "
                   "(compress()'s own ensemble above saw one)", markup=False)
    verdict = judge_compressed(point, reporter)
    guard_stops = sorted({r["stage"] for r in RunPaths(point.directory).records() if r.get("catastrophic_overfitting")})
    figures = {
        "recipe": point.recipe.name, "description": point.recipe.description, "multiplier": point.multiplier, "seed": point.config.seed,
        "overrides": list(point.overrides), "epochs": point.epochs, "seconds": seconds, "judge_seconds": time.perf_counter() - judged,
        "resumed": resumed, "load_average": {"start": load, "end": os.getloadavg()[0]}, "torch_threads": torch.get_num_threads(),
        "macs": {"dense": result.dense.macs, "compressed": result.compressed.macs},
        "mac_ratio": result.dense.macs / result.compressed.macs,
        "clean": _attack(verdict, "clean"), "pgd": _attack(verdict, "pgd"), "ensemble": _attack(verdict, "ensemble"),
        "warnings": verdict["warnings"], "guard_stops": guard_stops, "judge": verdict, "config": point.config.model_dump(mode="json"),
    }
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(figures, indent=1)))
    progress.print(f"{point.name}: {seconds:.0f} s training, {time.perf_counter() - started:.0f} s in all; "
                   f"ensemble {figures['ensemble']['accuracy']:.1%}", markup=False)
    return figures


# --- the verdicts, table and plot -------------------------------------------------------------


def aggregate(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per recipe and budget, shaped as a point: the means over its seeds. Each attack's
    ``spread`` is the standard deviation across seeds, or with one seed the judge's standard error."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["recipe"], p["multiplier"]), []).append(p)
    rows = []
    for (recipe, multiplier), group in groups.items():
        several = len(group) > 1

        def attack(name: str) -> dict[str, Any]:
            values = [p[name]["accuracy"] for p in group]
            return {"label": group[0][name]["label"], "n": group[0][name]["n"], "accuracy": statistics.fmean(values),
                    "spread": statistics.stdev(values) if several else group[0][name]["stderr"]}

        rows.append({
            "recipe": recipe, "multiplier": multiplier, "epochs": group[0]["epochs"], "overrides": group[0]["overrides"],
            "seeds": sorted(p.get("seed", 0) for p in group), "seconds": statistics.fmean(p["seconds"] for p in group),
            "mac_ratio": statistics.fmean(p["mac_ratio"] for p in group),
            "clean": attack("clean"), "pgd": attack("pgd"), "ensemble": attack("ensemble"),
            "guard_stops": sorted({s for p in group for s in p["guard_stops"]}), "warnings": [w for p in group for w in p["warnings"]],
        })
    return rows


def spread_kind(rows: list[dict[str, Any]]) -> str:
    counts = {len(r["seeds"]) for r in rows}
    if counts == {1}:
        return "± the judge's standard error (one seed)"
    return "± the standard deviation across seeds (" + ", ".join(map(str, sorted(counts))) + " seeds a row)"


def reach_line(rows: list[dict[str, Any]]) -> str | None:
    """Per recipe, the fewest mean seconds in which its mean ensemble accuracy reached the preset x1's, and the ratio."""
    reference = next((r for r in rows if r["recipe"] == "preset" and r["multiplier"] == 1), None)
    if reference is None:
        return None
    goal, parts = reference["ensemble"]["accuracy"], []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        reached = [r for r in rows if r["recipe"] == recipe and r["ensemble"]["accuracy"] >= goal]
        if not reached:
            parts.append(f"{recipe} did not")
            continue
        fastest = min(reached, key=lambda r: r["seconds"])
        parts.append(f"{recipe} x{fastest['multiplier']:g} in {fastest['seconds']:.0f} s ({reference['seconds'] / fastest['seconds']:.2f}x fewer seconds)")
    return f"reached the preset x1's mean ensemble accuracy ({goal:.1%} in {reference['seconds']:.0f} s): " + "; ".join(parts)


def shortfalls(figures: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Why a point is not eligible (empty: it is)."""
    out = []
    if figures["mac_ratio"] < args.min_mac_ratio:
        out.append(f"MACs {figures['mac_ratio']:.2f}x < {args.min_mac_ratio:g}x")
    if figures["clean"]["accuracy"] < args.min_clean:
        out.append(f"clean < {args.min_clean:.0%}")
    return out


def resolve_budget(points: list[dict[str, Any]], args: argparse.Namespace) -> float:
    """--time-budget in seconds; ``preset``: the seconds the preset recipe took at x1 here (the default's own time,
    on this machine and with these threads), plus 20% for timing noise."""
    if args.time_budget != PRESET_BUDGET:
        return args.time_budget
    reference = next((p for p in points if p["recipe"] == "preset" and p["multiplier"] == 1), None)
    if reference is None:
        raise RapcError("--time-budget preset needs the preset recipe at multiplier 1 among the points; give it or a number of seconds")
    return reference["seconds"] * PRESET_SLACK


def budget_text(args: argparse.Namespace) -> str:
    return f"{args.time_budget:.0f} s" + (" (the preset x1 point's time + 20%)" if args.budget_from_preset else "")


def pick(points: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any] | None:
    """The eligible point within the time budget with the highest ensemble accuracy (ties: the faster)."""
    eligible = [p for p in points if not shortfalls(p, args) and p["seconds"] <= args.time_budget]
    return max(eligible, key=lambda p: (p["ensemble"]["accuracy"], -p["seconds"]), default=None)


def _one_label(points: list[dict[str, Any]], attack: str) -> str | None:
    """The attack's label and n when every point shares them (they do unless the config's eval attack differs)."""
    labels = {(p[attack]["label"], p[attack]["n"]) for p in points}
    return f"{labels.pop()[0]}, n={points[0][attack]['n']}" if len(labels) == 1 else None


def results_table(points: list[dict[str, Any]], chosen: dict[str, Any] | None, args: argparse.Namespace) -> Table:
    pgd_label, ensemble_label = _one_label(points, "pgd"), _one_label(points, "ensemble")

    def accuracy(p: dict[str, Any], attack: str, shared: str | None, spread: bool = False) -> str:
        a = p[attack]
        text = f"{a['accuracy']:.1%}" + (f" ± {a['spread']:.1%}" if spread else "")
        return text if shared else f"{a['label']} (n={a['n']}): {text}"

    rows = []
    for p in points:
        missing = shortfalls(p, args)
        verdict = ("**pick**" if p is chosen else "eligible" if not missing else "; ".join(missing))
        if not missing and p["seconds"] > args.time_budget:
            verdict = "eligible, over the time budget"
        if p["guard_stops"]:
            verdict += f" (guard stopped {', '.join(p['guard_stops'])})"
        if p["warnings"]:
            verdict += f" ({len(p['warnings'])} judge warnings: see point.json)"
        rows.append((p["recipe"], f"x{p['multiplier']:g}", p["epochs"], str(len(p["seeds"])), f"{p['seconds']:.0f}", f"{p['mac_ratio']:.2f}x",
                     f"{p['clean']['accuracy']:.1%}", accuracy(p, "pgd", pgd_label), accuracy(p, "ensemble", ensemble_label, spread=True),
                     verdict))
    headers = ("recipe", "budget", "epochs", "seeds", "seconds", "MAC ratio", "clean",
               pgd_label or "PGD", ensemble_label or "ensemble", "verdict")
    return Table("Time to robustness: the compressed model's accuracy against the pipeline's seconds", headers, rows, label_columns=3)


def notes(args: argparse.Namespace, points: list[dict[str, Any]]) -> list[str]:
    cfg = load_config(args.config, args.set)
    threads = sorted({p["torch_threads"] for p in points})
    load = [v for p in points for v in p["load_average"].values()]
    return [
        f"config {args.config}" + (f" with {' '.join(args.set)}" if args.set else "") + f": {cfg.model.name} w={cfg.model.width} on {cfg.data.name}; "
        f"every point judged on the first {args.n} test images (the same images for clean, PGD and the ensemble, and for every point)",
        "seconds: wall-clock of the whole pipeline (data loading, training stages with per-epoch validation, hard prune, shrink, "
        f"saving), without the final judging; torch threads {', '.join(map(str, threads))}; load average (1 min) "
        f"{min(load):.1f}-{max(load):.1f} at the points' starts and ends (other processes slow every figure)",
        "stages.dense_control=false for every point: the benchmark compares compressed models, and the dense control would double the time",
        f"every row: the mean over its seeds, {spread_kind(aggregate(points))}",
        f"epochs: pretrain+admm+retrain; eligible: at least {args.min_mac_ratio:g}x fewer MACs and clean accuracy at least {args.min_clean:.0%}; "
        f"the pick: the eligible point with the highest ensemble accuracy within {budget_text(args)}",
        *[f"recipe {r.name}: {r.description}" for r in RECIPES.values() if r.name in {p["recipe"] for p in points}],
    ]


def pick_line(chosen: dict[str, Any] | None, args: argparse.Namespace) -> str:
    if chosen is None:
        return f"pick: none; no point is eligible within {budget_text(args)}"
    e = chosen["ensemble"]
    overrides = " ".join(chosen["overrides"]) or "(none: the config as it is)"
    return (f"pick: {chosen['recipe']} x{chosen['multiplier']:g} ({chosen['seconds']:.0f} s, {chosen['mac_ratio']:.2f}x fewer MACs, "
            f"clean {chosen['clean']['accuracy']:.1%}, ensemble {e['accuracy']:.1%} ± {e['spread']:.1%}, n={e['n']}, "
            f"{len(chosen['seeds'])} seed{'s' if len(chosen['seeds']) > 1 else ''}); "
            f"overrides on {args.config}" + (" with the --set ones" if args.set else "") + f": {overrides}")


def plot(points: list[dict[str, Any]], chosen: dict[str, Any] | None, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for index, name in enumerate(dict.fromkeys(p["recipe"] for p in points)):
        mine = sorted((p for p in points if p["recipe"] == name), key=lambda p: p["seconds"])
        color = f"C{index}"
        x, y = [p["seconds"] for p in mine], [100 * p["ensemble"]["accuracy"] for p in mine]
        ax.errorbar(x, y, yerr=[100 * p["ensemble"]["spread"] for p in mine], color=color, capsize=3, label=name)
        for p, xi, yi in zip(mine, x, y):  # filled: eligible; hollow: fails the MAC or clean constraint
            ax.plot(xi, yi, "o", color=color, markerfacecolor=color if not shortfalls(p, args) else "white")
            ax.annotate(f"x{p['multiplier']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if chosen is not None:
        ax.plot(chosen["seconds"], 100 * chosen["ensemble"]["accuracy"], "*", color="black", markersize=14, label="pick")
    ax.axvline(args.time_budget, color="0.4", linestyle="--", label=f"time budget {args.time_budget:.0f} s")
    ax.set_xlabel("seconds (whole pipeline, without the final judging)")
    label = _one_label(points, "ensemble") or "ensemble"
    ax.set_ylabel("ensemble accuracy of the compressed model (%)")
    ax.set_title(f"time to robustness, {args.config}\n{textwrap.fill(label, 100)}\n"
                 f"means over seeds, error bars {spread_kind(points)}; hollow markers: not eligible", fontsize=8)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# --- command line ------------------------------------------------------------------------------


def parse_list(kind: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(v) for v in text.split(",")]
        except (ValueError, RapcError) as exc:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r} ({exc})") from None
    return parse


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def _budget(text: str) -> float | str:
    if text == PRESET_BUDGET:
        return text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds or {PRESET_BUDGET!r}, got {text!r}")
    return value


def _multiplier(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("a multiplier must be positive")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_PRESET, metavar="PRESET", help="preset name or YAML file the recipes start from")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, before the recipe's; repeatable")
    parser.add_argument("--recipes", type=parse_list(_recipe, "recipe names"), default=",".join(RECIPES), metavar="R,R",
                        help=f"of {', '.join(RECIPES)}")
    parser.add_argument("--multipliers", type=parse_list(_multiplier, "positive numbers"), default="0.5,1,2", metavar="M,M",
                        help="budgets: every stage's epochs times M (rounded, at least 1)")
    parser.add_argument("--n", type=int, default=500, metavar="N", help="the judge's fixed subset: the first N test images")
    parser.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 per recipe and budget; the table gives their mean")
    parser.add_argument("--time-budget", type=_budget, default=300.0, metavar="SECONDS",
                        help=f"the pick's limit on the pipeline's seconds; {PRESET_BUDGET!r}: what the preset recipe took at x1, + 20%%")
    parser.add_argument("--min-mac-ratio", type=float, default=3.8, metavar="R", help="eligible: at least R times fewer MACs")
    parser.add_argument("--min-clean", type=float, default=0.95, metavar="P", help="eligible: clean accuracy at least P")
    parser.add_argument("--out", type=Path, default=Path("runs/time-to-robustness"), metavar="DIR",
                        help="one run directory per point, table.md and the plot")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch.set_num_threads(N) first; default: PyTorch's")
    parser.add_argument("--finished-only", action="store_true", help="table the points finished so far; train nothing")
    args = parser.parse_args(argv)
    if args.n < 1 or args.seeds < 1:
        parser.error("--n and --seeds must be at least 1")
    args.recipes = list(dict.fromkeys(args.recipes))
    args.multipliers = sorted(set(args.multipliers))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    points: list[dict[str, Any]] = []
    failed = []
    try:
        # by seed, then budget: a partial run spans the recipes and budgets
        todo = [Point.make(r, m, seed, args) for seed in range(args.seeds) for m in args.multipliers for r in args.recipes]
        if args.finished_only:
            todo = [p for p in todo if (p.directory / POINT).is_file()]
        with RichReporter(progress) as reporter:
            for index, point in enumerate(todo, 1):
                progress.print(f"[{index}/{len(todo)}] {point.name}: epochs {point.epochs} in {point.directory}", markup=False)
                try:
                    points.append(measure(point, reporter))
                except RapcError as exc:  # one point's failure (a NaN, say) does not stop the others
                    progress.print(f"error: {point.name}: {exc}", markup=False)
                    failed.append(point.name)
    except RapcError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted; the same command continues from the last checkpoint")
    if not points:
        sys.exit("error: no point finished")
    rows = aggregate(points)
    args.budget_from_preset = args.time_budget == PRESET_BUDGET
    try:
        args.time_budget = resolve_budget(rows, args)
    except RapcError as exc:
        sys.exit(f"error: {exc}")
    chosen = pick(rows, args)
    table = results_table(rows, chosen, args)
    reach = reach_line(rows)
    text = (table.markdown() + "\n" + "\n".join(f"- {line}" for line in notes(args, points)) + "\n\n" + pick_line(chosen, args) + "\n"
            + (f"{reach}\n" if reach else ""))
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "table.md", lambda tmp: tmp.write_text(text))
    atomic_write(args.out / "time_to_robustness.png", lambda tmp: plot(rows, chosen, args, tmp))
    print(f"wrote {args.out / 'table.md'} and {args.out / 'time_to_robustness.png'}")
    if failed:
        sys.exit(f"error: {len(failed)} points failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
