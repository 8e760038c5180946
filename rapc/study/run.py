"""The study: the shared dense models, every cell's rows, then the latency of all of them.

Ratios are per-layer factors: r = 4 prunes ``pruning.ratio = 1 - 1/r = 0.75`` of each
layer's weights (filter pruning then removes about r² of the model's parameters, since each
pruned filter takes the next layer's inputs with it; the report shows that ratio).

With ``seeds`` N, the dense models and every row are trained N times, with the config's seed,
seed + 1, ...: the dense models live in ``OUT/seed{s}/dense-robust/`` (and ``dense-natural``,
``dense-matched``), the rows in ``OUT/seed{s}/r{r}-{scheme}/{row}/``; each one's ``row.json``
marks it finished (see cache.py), so repeating the command trains nothing finished (a larger
N trains only the new seeds), and an interrupted row continues from its stage checkpoints.
The report gives each row's mean and standard deviation across seeds (seeds.py). The judge's
verdict is cached with the row under the protocol it was measured with (``judged_with``):
another protocol or n, or a row.json from before the judge, is judged again without
retraining. A seed's models are judged with the protocol seeded by that seed, so the attacks'
random starts vary with the training seed (the spread covers both), and a seed's rows are the
same whether ``--seeds 3`` trained them or ``--set seed=1`` did in another process on the same
OUT: seeds can run in parallel and a last ``--seeds N`` call gathers them. Latency is measured
again on every call (seconds), all models of the first seed interleaved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from rapc.bench.backends import BACKENDS
from rapc.bench.latency import TimingPolicy
from rapc.bench.run import machine
from rapc.config import Config, dump_config, updated, validate
from rapc.device import resolve_device
from rapc.errors import RapcError
from rapc.progress import Reporter, SilentReporter
from rapc.rundir import RunPaths, writable_dir
from rapc.study.cache import cached, write_json
from rapc.study.evaluation import TestData, judged, latency, protocol, size
from rapc.study.report import write_report
from rapc.study.rows import DEFAULT_ROWS, DENSE, RECIPES, ROWS, Cell, budget, final_model
from rapc.study.seeds import combine, seed_dir

ROW_FILE = "row.json"
JUDGE_FORMAT = 2  # of a row's "judge" entry; a row.json with another (or none: clean/robust/autoattack of v1) is judged again
STALE = ("clean", "robust", "autoattack")  # v1's figures without labels; dropped when a row is judged again


@dataclass(frozen=True)
class StudyOptions:
    ratios: tuple[float, ...] = (2.0, 4.0)
    schemes: tuple[str, ...] = ("filter",)
    rows: tuple[str, ...] = DEFAULT_ROWS
    n_ensemble: int | None = None  # the ensemble APGD-CE + APGD-T on the first n test images; None: all of them
    seeds: int = 1  # every cell and shared dense model trained this many times, with seeds cfg.seed, cfg.seed + 1, ...
    backends: tuple[str, ...] = ("ort-cpu", "ort-cuda", "torch-cudagraphs")  # ORT CPU everywhere, GPU backends where present
    batch_sizes: tuple[int, ...] = (1, 64)
    timing: TimingPolicy = field(default_factory=lambda: TimingPolicy(min_seconds=0.5))

    def __post_init__(self) -> None:
        for name in self.rows:
            ROWS.get(name)
        for name in self.backends:
            BACKENDS.get(name)
        if bad := [b for b in self.batch_sizes if b < 1]:
            raise RapcError(f"batch sizes must be at least 1, got {bad[0]}")
        if self.n_ensemble is not None and self.n_ensemble < 1:
            raise RapcError(f"--n-ensemble must be at least 1 (leave it out for all test images), got {self.n_ensemble}")
        if self.seeds < 1:
            raise RapcError(f"--seeds must be at least 1, got {self.seeds}")


@dataclass
class StudyResult:
    out: Path
    report: dict[str, Any]


def cell_config(cfg: Config, ratio: float, scheme: str) -> Config:
    """``cfg`` with its pruning scheme and ratio (fraction pruned, 1 - 1/ratio) set for one cell."""
    if not ratio > 1:
        raise RapcError(f"--ratios: {ratio:g} is not a compression factor; use factors above 1 such as 2,4 (4 keeps a quarter)")
    return updated(cfg, f"study cell {ratio:g}x {scheme}", pruning={"scheme": scheme, "ratio": 1 - 1 / ratio})


def _train_seconds(directory: Path) -> float:
    """Seconds spent in training steps (validation excluded), summed over the logged epochs."""
    return sum(record.get("train_seconds", 0.0) for record in RunPaths(directory).records())


def _claim(cfg: Config) -> str:
    """What a row directory is claimed with (cache.py): its config, and the version of the rows' recipes."""
    return f"# rapc study row recipes v{RECIPES}\n{dump_config(cfg)}"


def _claimed_by(cfg: Config) -> Callable[[str], bool]:
    """Whether a claim is ``cfg``'s: the same recipes version, and the same config once read under
    today's schema, so that a key added to rapc's config since (at its default) keeps finished rows."""
    header = _claim(cfg).partition("\n")[0]

    def same(claim: str) -> bool:
        first, _, body = claim.partition("\n")
        try:
            return first == header and validate(yaml.safe_load(body) or {}, "a study claim") == cfg
        except (RapcError, yaml.YAMLError):
            return False
    return same


class _Study:
    """Rows by seed and key (``dense-robust``, ``r4-filter/rapc``), trained and measured on first use.

    A row that needs another one (rapc needs dense-robust; scratch needs rapc's architecture)
    asks its cell's ``model_of``, which runs that row of the same seed first if it is not finished.
    """

    def __init__(self, cfg: Config, root: Path, cells: Sequence[tuple[float, str]], options: StudyOptions, reporter: Reporter) -> None:
        self.root, self.reporter = root, reporter
        self.device = resolve_device(cfg.device)
        self.data = TestData.make(cfg)  # the test split does not depend on the seed
        self.n_ensemble = options.n_ensemble
        self.protocol = protocol(cfg, options.n_ensemble)  # the first seed's; seed s judges with protocol(seed s)
        self.seeds = [cfg.seed + i for i in range(options.seeds)]
        self.cell_keys = [f"r{r:g}-{s}" for r, s in cells]
        self.shared: dict[int, Cell] = {}
        self.cells: dict[int, dict[str, Cell]] = {}
        for seed in self.seeds:
            seeded = cfg.model_copy(update={"seed": seed})
            self.shared[seed] = Cell(1.0, "dense", seeded, reporter, partial(self.model_of, seed, None))
            self.cells[seed] = {f"r{r:g}-{s}": Cell(r, s, cell_config(seeded, r, s), reporter, partial(self.model_of, seed, f"r{r:g}-{s}"))
                                for r, s in cells}
        self.rows: dict[tuple[int, str], dict[str, Any]] = {}

    def model_of(self, seed: int, cell_key: str | None, name: str) -> Path:
        return final_model(self.root / self.row(seed, None if name in DENSE else cell_key, name)["dir"])

    def row(self, seed: int, cell_key: str | None, name: str) -> dict[str, Any]:
        """A shared dense model (``cell_key`` None) or a row of a cell, trained with ``seed``: read, or trained and measured now."""
        key, cell, build = ((name, self.shared[seed], DENSE.get(name)) if cell_key is None
                            else (f"{cell_key}/{name}", self.cells[seed][cell_key], ROWS.get(name)))
        where = f"{seed_dir(seed)}/{key}"
        if (seed, key) in self.rows:
            return self.rows[seed, key]

        def train_and_measure(directory: Path) -> dict[str, Any]:
            self.reporter.log(f"study: {where}")
            start = time.perf_counter()
            trained = build(cell, directory)
            return {"key": key, "dir": where, "seed": seed, "ratio": cell.ratio, "scheme": cell.scheme, "row": name,
                    **trained.as_dict(), "train_seconds": _train_seconds(directory),
                    "wall_seconds": time.perf_counter() - start, **size(final_model(directory), cell.cfg, self.data)}

        directory = self.root / where
        row = cached(directory, ROW_FILE, _claim(cell.cfg), train_and_measure, _claimed_by(cell.cfg))
        judge_with = protocol(cell.cfg, self.n_ensemble)
        key_now = {"format": JUDGE_FORMAT, "protocol": asdict(judge_with), "n_test": len(self.data.test.dataset)}
        if row.get("judged_with") != key_now:  # trained now, or judged before with another protocol, n or format
            for stale in STALE:
                row.pop(stale, None)
            row |= {"judge": judged(final_model(directory), cell.cfg, self.data, judge_with, self.device, self.reporter, where),
                    "judged_with": key_now}
            write_json(directory / ROW_FILE, row)
        self.rows[seed, key] = row
        return row


def study(cfg: Config, out: str | Path, options: StudyOptions = StudyOptions(), reporter: Reporter | None = None) -> StudyResult:
    """Run (or re-read) the dense models and every row of every cell; write study.json, study.md and study.png."""
    cells = [(r, s) for r in options.ratios for s in options.schemes]
    for r, s in cells:  # every mistake before any training
        cell_config(cfg, r, s)
    root = writable_dir(out)
    reporter = reporter or SilentReporter()
    work = _Study(cfg, root, cells, options, reporter)
    names = [(None, name) for name in DENSE] + [(key, name) for key in work.cell_keys for name in options.rows]
    trained = {seed: [work.row(seed, key, name) for key, name in names] for seed in work.seeds}  # a seed's rows, then the next seed's
    lines = [combine([trained[seed][i] for seed in work.seeds]) for i in range(len(names))]
    dense, rows = lines[:len(DENSE)], lines[len(DENSE):]
    models = {line["key"]: final_model(root / line["seeds"][0]["dir"]) for line in lines}
    latencies, skipped = latency(models, options.backends, options.batch_sizes, options.timing, cfg.model.allow_import, reporter)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "data": cfg.data.name, "model": {"name": cfg.model.name, "width": cfg.model.width},
        "attack": cfg.attack.eval.model_dump(), "judge": asdict(work.protocol),
        "n_test": len(work.data.test.dataset), "seeds": work.seeds,
        "budget_epochs": budget(cfg), "dense": dense, "rows": rows,
        "latency": [l.as_dict() for l in latencies], "skipped": skipped, "threads": torch.get_num_threads(),
    }
    write_report(root, report)
    return StudyResult(root, report)
