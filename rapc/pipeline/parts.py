"""The parts of a training run (seed, data, architecture, model, batches, trainer), built one way
for ``rapc compress`` and for every row of a study.

Order is reproducibility: :meth:`RunParts.start` seeds the global RNG and loads the data, and
the next draws are the model's initialisation. A model built by :meth:`RunParts.fresh_model`
right after it is therefore the init ``rapc compress`` trains from with that config, whoever
builds it (the study's scratch and inherited rows rely on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rapc.config import Config
from rapc.data import Splits, load_data
from rapc.device import resolve_device, seed_everything
from rapc.modelio import Architecture, load_model
from rapc.pipeline.distributed import Ranks
from rapc.pipeline.trainer import RunData, Trainer
from rapc.pipeline.training_module import training_module
from rapc.progress import Reporter
from rapc.rundir import RunDir


@dataclass
class RunParts:
    cfg: Config
    splits: Splits
    architecture: Architecture  # the config's model for this data
    device: torch.device
    _data: RunData | None = field(default=None, repr=False)

    @classmethod
    def start(cls, cfg: Config, device: torch.device | None = None) -> RunParts:
        """Seed, load the data; the next global draws are the model's init."""
        seed_everything(cfg.seed)
        splits = load_data(cfg.data, cfg.seed)
        return cls(cfg, splits, Architecture.for_data(cfg.model, splits.info), device or resolve_device(cfg.device))

    def fresh_model(self, architecture: Architecture | None = None) -> nn.Module:
        """The config's architecture (or another, e.g. a shrunk one) initialised from the global RNG, on the device."""
        return (architecture or self.architecture).build(allow_import=self.cfg.model.allow_import).to(self.device)

    def saved_model(self, path: Path) -> nn.Module:
        """A saved model to train on, on the device."""
        return load_model(path, allow_import=self.cfg.model.allow_import).to(self.device).train()

    def data(self, ranks: Ranks = Ranks()) -> RunData:
        """The run's batches (this rank's share of the training split), made on first use."""
        if self._data is None:
            self._data = RunData.make(self.cfg, self.splits, self.device, ranks)
        return self._data

    def trainer(self, model: nn.Module, run: RunDir, reporter: Reporter, ranks: Ranks = Ranks()) -> Trainer:
        """The trainer of ``model`` in ``run``, its steps through the config's training module (DDP, compiled)."""
        data = self.data(ranks)
        return Trainer(self.cfg, model, self.device, run, data.train, data.val, data.guard_batch, reporter, ranks,
                       training_module(model, self.cfg, self.device, ranks))
