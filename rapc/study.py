"""``rapc study``: rapc's pipeline beside the baselines a reviewer asks for, per ratio and scheme.

Each cell (compression ratio r, scheme) runs a set of *rows*, one registered builder each:

    rapc     the whole pipeline (adversarial dense -> ADMM -> masked retrain -> shrink)
    scratch  the same shrunk architecture, randomly initialised and trained adversarially
             for as many epochs as rapc's ADMM + retraining stages (its training recipe,
             clean epochs and eps ramp are the config's pretraining stage: training from scratch)

Not yet implemented (issue 6): inherited init (shrunk dense weights), adversarial fine-tuning
of a compressed standard model, one-shot magnitude pruning + adversarial fine-tuning. Each is
one more ``@ROWS.register()`` function.

Ratios are compression factors: r = 4 prunes ``pruning.ratio = 1 - 1/r = 0.75`` of each
layer's weights. Every row lives in ``OUT/r{r}-{scheme}/{row}/``; its ``row.json``, written
atomically and last, marks it finished, so repeating the command reruns nothing finished (and
an interrupted row continues from its stage checkpoints).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from rapc.attacks import evaluate
from rapc.config import Config, dump_config, validate
from rapc.data import head, load_data, loader
from rapc.errors import RapcError
from rapc.modelio import read_architecture
from rapc.pipeline.compress import Trainer, compress, resolve_device, resume, seed_everything
from rapc.pipeline.distributed import Ranks
from rapc.pipeline.measure import summary
from rapc.pipeline.speed import training_module
from rapc.progress import Reporter, SilentReporter
from rapc.registry import Registry
from rapc.rundir import RunDir, atomic_write, writable_dir
from rapc.tables import Table

ROW_FILE = "row.json"
ROW_CONFIG = "study-config.yaml"
NOT_IMPLEMENTED = ("inherited", "finetune-standard", "oneshot-magnitude")


@dataclass
class Cell:
    """One (ratio, scheme) of the study: its config, its directory, and the rows finished so far."""

    ratio: float  # compression factor, > 1
    scheme: str
    cfg: Config
    root: Path
    reporter: Reporter
    _done: dict[str, dict[str, Any]] = field(default_factory=dict)

    def row(self, name: str) -> dict[str, Any]:
        """The figures of row ``name`` in this cell: read from its row.json, or computed and written now."""
        if name not in self._done:
            self._done[name] = _run_row(self, name)
        return self._done[name]

    def directory(self, name: str) -> Path:
        return self.root / name


# A row builder trains and measures one row in ``directory`` and returns its figures:
# params, macs, clean, robust (test split), train_seconds, epochs, and anything it wants to add.
RowBuilder = Callable[[Cell, Path], dict[str, Any]]
ROWS: Registry[RowBuilder] = Registry("study row")
DEFAULT_ROWS = ("rapc", "scratch")


@ROWS.register("rapc")
def rapc_row(cell: Cell, directory: Path) -> dict[str, Any]:
    """rapc's pipeline; a started run in ``directory`` is resumed, a finished one only re-read."""
    started = (directory / "config.yaml").is_file()
    result = resume(directory, cell.reporter) if started else compress(cell.cfg, directory, cell.reporter)
    figures = {key: result.compressed[key] for key in ("params", "macs", "clean", "robust")}
    stages = cell.cfg.stages
    return figures | {
        "dense_params": result.dense["params"], "dense_macs": result.dense["macs"],
        "dense_clean": result.dense["clean"], "dense_robust": result.dense["robust"],
        "epochs": {"pretrain": stages.pretrain.epochs, "admm": stages.admm.epochs, "retrain": stages.retrain.epochs},
        "train_seconds": _train_seconds(directory),
    }


@ROWS.register("scratch")
def scratch_row(cell: Cell, directory: Path) -> dict[str, Any]:
    """rapc's shrunk architecture, random init, adversarial training for rapc's ADMM + retrain epochs."""
    cfg = cell.cfg
    compressed = cell.directory("rapc") / "model"
    rapc = cell.row("rapc")  # the architecture comes from rapc's finished row
    stages = cfg.stages
    budget = stages.admm.epochs + stages.retrain.epochs
    stage = stages.pretrain.model_copy(update={"epochs": budget})
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model = read_architecture(compressed).build(allow_import=cfg.model.allow_import).to(device)
    data = _Loaders.make(cfg, device)
    run = RunDir(directory)
    trainer = Trainer(cfg, model, device, run, data.train, data.val, data.guard_batch, cell.reporter,
                      train_model=training_module(model, cfg, device, Ranks()))
    trainer.stage("scratch", stage)
    model.eval()
    return summary(model, data.example) | evaluate(model, data.test, cfg.attack.eval, device) | {
        "dense_params": rapc["dense_params"], "epochs": {"scratch": budget}, "recipe": "stages.pretrain (optimizer, schedule, clean and eps-ramp epochs)",
        "train_seconds": _train_seconds(directory),
    }


@dataclass(frozen=True)
class _Loaders:
    """The data of a row, split and batched as ``rapc compress`` does."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    guard_batch: tuple[torch.Tensor, torch.Tensor]
    example: torch.Tensor  # up to 64 validation images, on the device, for parameter and MAC counts

    @classmethod
    def make(cls, cfg: Config, device: torch.device) -> _Loaders:
        splits = load_data(cfg.data, cfg.seed)
        pin, workers = device.type == "cuda", cfg.data.workers
        val = loader(head(splits.val, cfg.eval.n_val), cfg.data.eval_batch_size, shuffle=False, workers=workers, pin=pin)
        return cls(
            loader(splits.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed, workers=workers, pin=pin), val,
            loader(head(splits.test, cfg.eval.n_test), cfg.data.eval_batch_size, shuffle=False, workers=workers, pin=pin),
            next(iter(loader(splits.train, 256, shuffle=False))), next(iter(val))[0][:64].to(device),
        )


def _train_seconds(directory: Path) -> float:
    """Seconds spent in training steps (validation excluded), summed over the row's logged epochs."""
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return 0.0
    return sum(json.loads(line).get("train_seconds", 0.0) for line in path.read_text().splitlines() if line.strip())


def _run_row(cell: Cell, name: str) -> dict[str, Any]:
    build = ROWS.get(name)
    directory = writable_dir(cell.directory(name))
    done = directory / ROW_FILE
    config = dump_config(cell.cfg)
    claimed = directory / ROW_CONFIG
    if claimed.is_file() and claimed.read_text() != config:
        raise RapcError(f"{directory} holds a study row made with another config; choose another --out for this one")
    if done.is_file():
        return json.loads(done.read_text())
    atomic_write(claimed, lambda tmp: tmp.write_text(config))
    cell.reporter.log(f"study: ratio {cell.ratio:g}x, {cell.scheme}: row {name}")
    start = time.perf_counter()
    figures = build(cell, directory)
    row = {"ratio": cell.ratio, "scheme": cell.scheme, "row": name, **figures,
           "wall_seconds": time.perf_counter() - start, "dir": str(directory)}
    atomic_write(done, lambda tmp: tmp.write_text(json.dumps(row, indent=1)))
    return row


def cell_config(cfg: Config, ratio: float, scheme: str) -> Config:
    """``cfg`` with its pruning scheme and ratio (fraction pruned, 1 - 1/ratio) set for one cell."""
    if not ratio > 1:
        raise RapcError(f"--ratios: {ratio:g} is not a compression factor; use factors above 1 such as 2,4 (4 keeps a quarter)")
    data = cfg.model_dump(mode="json")
    data["pruning"] |= {"scheme": scheme, "ratio": 1 - 1 / ratio}
    return validate(data, f"study cell {ratio:g}x {scheme}")


@dataclass
class StudyResult:
    out: Path
    rows: list[dict[str, Any]]
    not_implemented: tuple[str, ...] = NOT_IMPLEMENTED


def study(cfg: Config, out: str | Path, ratios: Sequence[float], schemes: Sequence[str], rows: Sequence[str] = DEFAULT_ROWS,
          reporter: Reporter | None = None) -> StudyResult:
    """Run (or re-read) every row for every ratio and scheme; write OUT/study.json and OUT/study.md."""
    for name in rows:
        ROWS.get(name)
    cells = [(r, s, cell_config(cfg, r, s)) for r in ratios for s in schemes]  # every mistake before any training
    root = writable_dir(out)
    reporter = reporter or SilentReporter()
    results = []
    for ratio, scheme, cell_cfg in cells:
        cell = Cell(ratio, scheme, cell_cfg, root / f"r{ratio:g}-{scheme}", reporter)
        results += [cell.row(name) for name in rows]
    result = StudyResult(root, results)
    atomic_write(root / "study.json", lambda tmp: tmp.write_text(json.dumps(
        {"rows": results, "attack": cfg.attack.eval.model_dump(), "not_implemented": list(NOT_IMPLEMENTED)}, indent=1)))
    atomic_write(root / "study.md", lambda tmp: tmp.write_text(markdown(result, cfg.attack.eval.eps)))
    return result


HEADERS = ("ratio", "scheme", "row", "params", "vs dense", "MACs", "clean", "PGD", "epochs", "train s")


def table(result: StudyResult, eps: float) -> Table:
    """The study as text cells, for Markdown and the terminal alike."""
    rows = [
        (f"{row['ratio']:g}x", row["scheme"], row["row"], f"{row['params']:,}",
         f"{row['dense_params'] / row['params']:.2f}x smaller", f"{row['macs']:,}", f"{row['clean']:.2%}",
         f"{row['robust']:.2%}", " + ".join(f"{n} {e}" for n, e in row["epochs"].items()), f"{row['train_seconds']:.1f}")
        for row in result.rows
    ]
    return Table(f"rapc study (test split, PGD eps {eps:g})", HEADERS, rows, label_columns=3)


def markdown(result: StudyResult, eps: float) -> str:
    return "\n".join([
        "# rapc study", "",
        "`scratch`: rapc's shrunk architecture, random init, adversarially trained for as many epochs as rapc's "
        "ADMM + retraining (the pretraining stage's recipe). `train s`: seconds in training steps, validation "
        "excluded; rapc's include its dense pretraining.", "",
        table(result, eps).markdown(),
        f"Not implemented yet: {', '.join(result.not_implemented)}.", "",
    ])
