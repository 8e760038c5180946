"""The run directory: the only state of a run. Every file is written atomically,
so an interrupted run never leaves a partial file where a complete one is expected.

    runs/NAME/config.yaml          resolved config
    runs/NAME/metrics.jsonl        one line per epoch
    runs/NAME/checkpoints/STAGE.pt state dicts (loaded with weights_only=True)
    runs/NAME/dense/               the dense robust model (saved-model format)
    runs/NAME/model/               the compressed, shrunk model
    runs/NAME/summary.json         dense vs compressed figures and the shrink report
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rapc.config import Config, dump_config
from rapc.errors import RapcError


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
        raise RapcError(f"cannot write the run directory {path} ({exc.strerror or exc})") from None
    return path


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = writable_dir(root)
        (self.root / "checkpoints").mkdir(exist_ok=True)

    @property
    def dense(self) -> Path:
        return self.root / "dense"

    @property
    def model(self) -> Path:
        return self.root / "model"

    def checkpoint(self, stage: str) -> Path:
        return self.root / "checkpoints" / f"{stage}.pt"

    def write_config(self, config: Config) -> None:
        atomic_write(self.root / "config.yaml", lambda tmp: tmp.write_text(dump_config(config)))

    def write_json(self, name: str, data: Any) -> Path:
        return atomic_write(self.root / name, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.root / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def save_checkpoint(self, stage: str, state: dict[str, Any]) -> None:
        atomic_write(self.checkpoint(stage), lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, stage: str) -> dict[str, Any]:
        try:
            return torch.load(self.checkpoint(stage), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
            raise RapcError(f"{self.checkpoint(stage)}: not a loadable checkpoint ({type(exc).__name__})") from None
