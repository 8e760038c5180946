"""The run directory: the only state of a run. Every file is written atomically,
so an interrupted run never leaves a partial file where a complete one is expected.

    runs/NAME/config.yaml          resolved config
    runs/NAME/metrics.jsonl        one line per epoch
    runs/NAME/start_check.json     with a given start model (stages.check_start): its verdict
    runs/NAME/checkpoints/STAGE.pt state dicts (loaded with weights_only=True)
    runs/NAME/pretrained/          the dense model after pretraining: where pruning starts
    runs/NAME/dense/               the dense baseline the compressed model is compared with: the
                                   pretrained model trained on for as long as pruning took
                                   (stages.dense_control), else the pretrained model itself
    runs/NAME/compressed/          the compressed, shrunk model
    runs/NAME/allocation/          with pruning.target: the per-layer ratios solved for it
                                   (allocation.json, reused on resume), their table and plot
    runs/NAME/judgement/MODEL.safetensors
                                   the final judge's per-image verdicts and adversarial images
                                   of dense and compressed (rapc.judgement), for bench to reuse
    runs/NAME/trained.json         the shrink report, per-layer shapes, notes and what the dense
                                   model is; written with the models, so it marks a trained run
    runs/NAME/summary.json         trained.json with the judge's figures of dense and compressed
                                   (rapc.pipeline.report); written last, so it marks a finished run
    runs/NAME/export/              rapc export's ONNX files, engines and fidelity.json
    runs/NAME/bench/               rapc bench's report, plots and the verdicts it judged itself

Each checkpoint records how much of metrics.jsonl it covers: a resumed run cuts the
file back to that, so the work it redoes is not logged twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rapc.config import Config, dump_config, load_config
from rapc.errors import RapcError

# The version of what a checkpoint holds (a stage's state: rapc.pipeline.checkpoint.StageState);
# raised whenever that changes, so a checkpoint of another rapc is refused rather than misread.
CHECKPOINT_FORMAT = 2


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """write(tmp) then fsync and rename over ``path``: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove it writable, or say so in one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RapcError(f"cannot write to {path} ({exc.strerror or exc})") from None
    return path


class RunPaths:
    """Where each part of a run lives, and what reading it needs; creates nothing.

    Every path inside a run directory is spelled here only, so that the layout in the module
    docstring is the one every command reads and writes.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def pretrained(self) -> Path:
        return self.root / "pretrained"

    @property
    def allocation(self) -> Path:
        return self.root / "allocation"

    @property
    def start_check(self) -> Path:
        """The start model's verdict (stages.check_start): a file, not a metrics line, because a resume
        cuts metrics.jsonl back to the last checkpoint and the check, once passed, is not run again."""
        return self.root / "start_check.json"

    @property
    def dense(self) -> Path:
        return self.root / "dense"

    @property
    def compressed(self) -> Path:
        return self.root / "compressed"

    def models(self) -> dict[str, Path]:
        """The run's two saved models by name, the names their ONNX files and bench artifacts take."""
        return {"dense": self.dense, "compressed": self.compressed}

    def judgement(self, model: str) -> Path:
        """The final judge's verdict on one of :meth:`models`, per image and with its adversarial images."""
        return self.root / "judgement" / f"{model}.safetensors"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def bench(self) -> Path:
        return self.root / "bench"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def records(self) -> list[dict[str, Any]]:
        """metrics.jsonl's lines (none before the first epoch)."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def checkpoint(self, stage: str) -> Path:
        return self.root / "checkpoints" / f"{stage}.pt"

    def config(self) -> Config:
        return load_config(str(self.config_path))

    @property
    def trained_path(self) -> Path:
        return self.root / "trained.json"

    def trained(self) -> dict[str, Any] | None:
        """What training recorded beside the models, or None before training finished."""
        return json.loads(self.trained_path.read_text()) if self.trained_path.is_file() else None

    def start_check_figures(self) -> dict[str, Any] | None:
        return json.loads(self.start_check.read_text()) if self.start_check.is_file() else None

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    def summary(self) -> dict[str, Any] | None:
        """The finished run's summary.json, or None while the run is unfinished."""
        return json.loads(self.summary_path.read_text()) if self.summary_path.is_file() else None

    def has_checkpoint(self, stage: str) -> bool:
        return self.checkpoint(stage).is_file()

    def load_checkpoint(self, stage: str, mmap: bool = False) -> dict[str, Any]:
        try:
            state = torch.load(self.checkpoint(stage), map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
            raise RapcError(f"{self.checkpoint(stage)}: not a loadable checkpoint ({type(exc).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise self.foreign_checkpoint(stage)
        return state

    def foreign_checkpoint(self, stage: str) -> RapcError:
        """The error for a checkpoint this rapc cannot continue from (older, newer, or not rapc's)."""
        return RapcError(f"checkpoint {self.checkpoint(stage)} was written by another version of rapc; start a new run")


def open_run(root: str | Path) -> RunPaths:
    """An existing run directory, to read, resume, export or bench (a run is a directory with its config.yaml)."""
    run = RunPaths(root)
    if not run.config_path.is_file():
        raise RapcError(f"{root} is not a run directory (no config.yaml); make one with `rapc compress --out {root}`")
    return run


class RunDir(RunPaths):
    """A run directory that this process writes."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(writable_dir(root))
        (self.root / "checkpoints").mkdir(exist_ok=True)

    def start(self, config: Config) -> None:
        """Begin a new run here; a directory that holds one is never overwritten (its work would be lost).

        A config.yaml alone is no work: a run that failed on its input before training may start again.
        """
        started = self.metrics.exists() or self.pretrained.exists() or any((self.root / "checkpoints").glob("*.pt"))
        if started:
            raise RapcError(f"{self.root} already holds a run: `rapc compress --resume {self.root}` continues it; choose another --out for a new one")
        atomic_write(self.config_path, lambda tmp: tmp.write_text(dump_config(config)))

    def write_summary(self, data: Any) -> Path:
        """Written last: its presence marks a finished run."""
        return atomic_write(self.summary_path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))

    def write_trained(self, data: Any) -> Path:
        """Written after the models: its presence marks a trained run, ready to judge."""
        return atomic_write(self.trained_path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))

    def write_start_check(self, figures: dict[str, Any]) -> None:
        atomic_write(self.start_check, lambda tmp: tmp.write_text(json.dumps(figures, indent=1)))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def _metrics_bytes(self) -> int:
        return self.metrics.stat().st_size if self.metrics.is_file() else 0

    def save_checkpoint(self, stage: str, state: dict[str, Any]) -> None:
        state = {**state, "metrics_bytes": self._metrics_bytes(), "format": CHECKPOINT_FORMAT}
        atomic_write(self.checkpoint(stage), lambda tmp: torch.save(state, tmp))

    def rewind(self, stages: Sequence[str]) -> None:
        """Before resuming: cut metrics.jsonl back to what the latest checkpoint (in stage order)
        covers, and remove temporary files a kill left half-written (never the only copy of anything)."""
        latest = next((stage for stage in reversed(stages) if self.has_checkpoint(stage)), None)
        keep = self.load_checkpoint(latest, mmap=True)["metrics_bytes"] if latest else 0
        if self._metrics_bytes() > keep:
            os.truncate(self.metrics, keep)
        for tmp in self.root.rglob(".*.tmp"):
            tmp.unlink()


class ReadOnlyRunDir(RunDir):
    """The run directory as the other ranks of a torchrun see it: rank 0 writes it; they read
    what rank 0 wrote (checkpoints) and write nothing."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def start(self, config: Config) -> None:
        pass

    def write_summary(self, data: Any) -> Path:
        return self.summary_path

    def write_trained(self, data: Any) -> Path:
        return self.trained_path

    def write_start_check(self, figures: dict[str, Any]) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        pass

    def save_checkpoint(self, stage: str, state: dict[str, Any]) -> None:
        pass

    def rewind(self, stages: Sequence[str]) -> None:
        pass
