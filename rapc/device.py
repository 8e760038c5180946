"""Where the work runs and how reproducibly: the device a config names, and every seed at once.

A core module, so that each stage (compress, export, bench, study) picks its device the
same way without importing another stage.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from rapc.errors import RapcError


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one; a GPU asked for by name must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RapcError(f"device: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RapcError(f"device: {name} was asked for but no CUDA GPU is available; use device=cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
