"""The saved-model format: no pickles, ever.

A model directory holds ``architecture.json`` (registry builder, its arguments,
the input shape, and torch-pruning's pruning history) and ``weights.safetensors``.
Loading rebuilds the dense architecture, replays the pruning history on it and
loads the weights; any mismatch names the tensor and both shapes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rapc.config import ModelConfig
from rapc.data import DatasetInfo
from rapc.errors import RapcError
from rapc.graph import build_graph
from rapc.models import create_model
from rapc.rundir import RunPaths, atomic_write

FORMAT = "rapc-model/1"
ARCHITECTURE = "architecture.json"
WEIGHTS = "weights.safetensors"


@dataclass
class Architecture:
    builder: str
    args: dict[str, Any]
    input_shape: list[int]  # [channels, height, width] of one image
    pruning_history: list = field(default_factory=list)

    @classmethod
    def for_data(cls, model: ModelConfig, info: DatasetInfo) -> Architecture:
        """The dense architecture a config builds for a dataset: its classes, channels, size and statistics."""
        args = {
            "num_classes": info.num_classes,
            "in_channels": info.channels,
            "image_size": info.image_size,
            "width": model.width,
            "mean": list(info.mean),
            "std": list(info.std),
            **model.kwargs,
        }
        return cls(model.name, args, [info.channels, info.image_size, info.image_size])

    def example(self, batch: int = 2) -> torch.Tensor:
        return torch.rand(batch, *self.input_shape)

    def build(self, allow_import: bool = False) -> nn.Module:
        """The architecture with its pruning replayed, randomly initialised."""
        model = create_model(self.builder, allow_import=allow_import, **self.args)
        if self.pruning_history:
            try:
                build_graph(model, self.example()).load_pruning_history(self.pruning_history)
            except (KeyError, IndexError, AttributeError, RuntimeError, TypeError, ValueError) as exc:  # a malformed record
                raise RapcError(f"pruning history does not fit the {self.builder} architecture ({exc})") from None
        return model


def save_model(model: nn.Module, architecture: Architecture, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    record = {"format": FORMAT, **asdict(architecture)}
    atomic_write(directory / ARCHITECTURE, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return directory


def read_architecture(directory: Path) -> Architecture:
    path = directory / ARCHITECTURE
    if not path.is_file():
        raise RapcError(f"{directory} holds no saved model ({ARCHITECTURE} is missing)")
    try:
        record = json.loads(path.read_text())
        if record.pop("format", None) != FORMAT:
            raise RapcError(f"{path}: not a {FORMAT} architecture record")
        architecture = Architecture(**record)
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise RapcError(f"{path}: unreadable architecture record ({exc})") from None
    shape = architecture.input_shape
    if not (isinstance(architecture.builder, str) and isinstance(architecture.args, dict)
            and isinstance(architecture.pruning_history, list)
            and isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise RapcError(f"{path}: unreadable architecture record (expected a builder name, an args mapping, "
                        f"input_shape [channels, height, width] and a pruning_history list)")
    return architecture


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RapcError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RapcError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into ``model``; every missing, extra or mis-shaped tensor is named."""
    weights = _read_weights(path)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in weights:
            raise RapcError(f"{path}: tensor {name} is missing")
        if weights[name].shape != tensor.shape:
            raise RapcError(f"{path}: tensor {name} has shape {list(weights[name].shape)}, the architecture expects {list(tensor.shape)}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise RapcError(f"{path}: tensor {extra[0]} is not part of the architecture")
    model.load_state_dict(weights)
    return model


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory whose compressed model is in ``compressed/``."""
    path = Path(path)
    if not path.exists():
        raise RapcError(f"{path} does not exist")
    if (path / ARCHITECTURE).is_file():
        return path
    compressed = RunPaths(path).compressed
    if (compressed / ARCHITECTURE).is_file():
        return compressed
    raise RapcError(f"{path} holds no saved model (no {ARCHITECTURE} there or in {compressed})")


def load_model(path: str | Path, *, allow_import: bool = False) -> nn.Module:
    """The runnable model saved in ``path`` (a model dir, or a run dir for its compressed model), in eval mode."""
    directory = resolve_model_dir(path)
    architecture = read_architecture(directory)
    try:
        model = architecture.build(allow_import=allow_import)
    except RapcError as exc:  # an unknown builder, arguments or history that do not fit: name the file
        raise RapcError(f"{directory / ARCHITECTURE}: {exc}") from None
    return load_weights(model, directory / WEIGHTS).eval()
