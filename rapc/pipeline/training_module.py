"""The module that trains: the precision and speed switches of the config, and DDP, applied in one place.

The model itself stays the user's module (parameter names ``conv1.weight``): checkpoints,
ADMM, masks, evaluation and the shrink work on it; only the training steps go through
the wrapped module, which shares its parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from rapc.config import Config
from rapc.pipeline.distributed import Ranks


def training_module(model: nn.Module, cfg: Config, device: torch.device, ranks: Ranks) -> nn.Module:
    """channels_last (in place, on ``model``), then DDP under torchrun, then torch.compile around both
    (compiling the DDP module lets the compiler see its gradient buckets)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    module = ranks.wrap(model, device)
    return torch.compile(module) if cfg.compile else module
