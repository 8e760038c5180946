"""Shared small, real fixtures: scikit-learn's digits and a LeNet trained on them in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rapc.config import Config, load_config
from rapc.data import Splits, load_data, loader
from rapc.modelio import Architecture


@pytest.fixture(scope="session")
def digits_cfg() -> Config:
    return load_config("digits-lenet-filter")


@pytest.fixture(scope="session")
def digits(digits_cfg: Config) -> Splits:
    return load_data(digits_cfg.data, seed=0)


@pytest.fixture(scope="session")
def digits_batch(digits: Splits) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader(digits.test, 360, shuffle=False)))


@pytest.fixture(scope="session")
def trained_lenet(digits_cfg: Config, digits: Splits) -> torch.nn.Module:
    """LeNet w=8 trained cleanly on digits for a few epochs (~97% test accuracy, not robust)."""
    torch.manual_seed(0)
    cfg = digits_cfg.model_copy(deep=True)
    cfg.model.width = 8
    model = Architecture.for_data(cfg.model, digits.info).build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        for x, y in loader(digits.train, 64, shuffle=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_run(digits_cfg: Config, tmp_path_factory) -> Path:
    """A short but complete compress run on digits, made through the library."""
    from rapc.pipeline.compress import compress

    cfg = digits_cfg.model_copy(deep=True)
    cfg.stages.pretrain.epochs, cfg.stages.admm.epochs, cfg.stages.retrain.epochs = 4, 2, 1
    return compress(cfg, tmp_path_factory.mktemp("runs") / "digits").run
