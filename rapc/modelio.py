"""The saved-model format: no pickles, ever.

A model directory holds ``architecture.json`` (registry builder, its arguments,
the input shape, and torch-pruning's pruning history) and ``weights.safetensors``.
Loading rebuilds the dense architecture, replays the pruning history on it and
loads the weights; any mismatch names the tensor and both shapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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
        """The dense architecture a config builds for a dataset: its classes, channels, size and the
        input statistics of ``model.normalize`` (None in ``args``: no normalization)."""
        mean, std = _statistics(model, info)
        args = {
            "num_classes": info.num_classes,
            "in_channels": info.channels,
            "image_size": info.image_size,
            "width": model.width,
            "mean": mean,
            "std": std,
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


def _statistics(model: ModelConfig, info: DatasetInfo) -> tuple[list[float] | None, list[float] | None]:
    """Per-channel mean and std the model normalizes its [0,1] pixels with; (None, None): it does not."""
    normalize = model.normalize
    if normalize is None:
        return list(info.mean), list(info.std)
    if normalize == "none":
        return None, None
    if len(normalize.mean) != info.channels:
        raise RapcError(f"model.normalize gives {len(normalize.mean)} values per statistic, but the images have "
                        f"{info.channels} channel{'s' if info.channels > 1 else ''}; give one mean and std per channel")
    return list(normalize.mean), list(normalize.std)


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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RapcError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RapcError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def _names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


def misfit(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], holder: str = "the architecture") -> str | None:
    """Why ``given`` tensors cannot be loaded where ``expected`` ones are (a state dict), or None if they fit.

    One sentence for a one-line error: the first problem in words, then, if there are more, every
    missing, extra and mis-shaped tensor by name (up to 20 of each), so one attempt shows them all.
    """
    missing = [name for name in expected if name not in given]
    extra = [name for name in given if name not in expected]
    misshaped = [name for name in expected if name in given and given[name].shape != expected[name].shape]
    if misshaped:
        name = misshaped[0]
        first = f"tensor {name} has shape {_shape(given[name])}, {holder} expects {_shape(expected[name])}"
    elif missing:
        first = f"tensor {missing[0]} is missing"
    elif extra:
        first = f"tensor {extra[0]} is not part of {holder}"
    else:
        return None
    if len(missing) + len(extra) + len(misshaped) == 1:
        return first
    counts = []
    if missing:
        counts.append(f"{len(missing)} missing ({_names(missing)})")
    if extra:
        counts.append(f"{len(extra)} extra ({_names(extra)})")
    if misshaped:
        shapes = [f"{n}: file {_shape(given[n])}, {holder.removeprefix('the ')} {_shape(expected[n])}" for n in misshaped]
        counts.append(f"{len(misshaped)} mis-shaped ({_names(shapes)})")
    return f"{first}; in all {', '.join(counts)}"


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into ``model``; every missing, extra or mis-shaped tensor is named."""
    weights = read_safetensors(path)
    problem = misfit(model.state_dict(), weights)
    if problem:
        raise RapcError(f"{path}: {problem}")
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
