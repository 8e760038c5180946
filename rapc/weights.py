"""A user's own weights file as the dense start: read it without running code, fit it to the model.

Two formats: safetensors, and a PyTorch state dict (``.pt``/``.pth``) read with
``torch.load(weights_only=True)``, which refuses any pickled object other than tensors and
plain containers, so a file can never run code here. Training scripts save their state dicts
in a few common shapes (inside a checkpoint dict, under a DataParallel or torch.compile
prefix); those are unwrapped. rapc's own input normalization comes from the config
(``model.normalize``), never silently from the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rapc.config import WEIGHTS_SUFFIXES
from rapc.errors import RapcError
from rapc.modelio import misfit, read_safetensors
from rapc.models import Normalize, Normalized

# Where training scripts put the state dict inside a checkpoint dict, in the order they are looked for.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes a wrapper adds to every key: DataParallel / DistributedDataParallel, a Lightning-style
# `self.model`, torch.compile.
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a state dict saved with ``torch.save`` (on the CPU).

    A checkpoint dict holding the state dict under ``state_dict``, ``model_state_dict`` or
    ``model`` is unwrapped; what sits beside it (optimizer state, epoch) is ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise RapcError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in WEIGHTS_SUFFIXES:
        raise RapcError(f"{path}: not a weights file; expected one of {', '.join(WEIGHTS_SUFFIXES)}")
    if suffix == ".safetensors":
        tensors = read_safetensors(path)
    else:
        tensors = _state_dict(_torch_load(path), path)
    if not tensors:
        raise RapcError(f"{path} holds no tensors")
    return tensors


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError... for files it cannot read
        message = str(exc)
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if needs:  # the pickle names a class or function to call: a whole nn.Module, numpy arrays, argparse options...
            raise RapcError(f"{path} is a pickled Python object (it needs {needs.group(1)} to load), not a state dict of "
                            f"tensors; rapc never runs code from a file: save the weights with "
                            f"torch.save(model.state_dict(), {path.name!r}) or as safetensors") from None
        detail = message.partition("WeightsUnpickler error:")[2] or message
        first = next((line.strip() for line in detail.splitlines() if line.strip()), "no details")
        raise RapcError(f"{path}: corrupt or not a PyTorch file ({type(exc).__name__}: {first})") from None


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside what ``torch.load`` returned: itself, or under a checkpoint key, nested or not."""
    while isinstance(loaded, Mapping) and not _is_tensor_dict(loaded):
        inner = next((loaded[key] for key in STATE_DICT_KEYS if isinstance(loaded.get(key), Mapping)), None)
        if inner is None:
            break
        loaded = inner
    if not isinstance(loaded, Mapping):
        raise RapcError(f"{path} holds a {type(loaded).__name__}, not a state dict (a mapping of tensor names to tensors); "
                        f"save model.state_dict()")
    others = [f"{key} ({type(value).__name__})" for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if others:
        raise RapcError(f"{path}: entries {', '.join(map(str, others[:5]))}{' ...' if len(others) > 5 else ''} are not tensors, "
                        f"and no {' / '.join(STATE_DICT_KEYS)} entry holds the state dict; save model.state_dict() alone")
    return {str(key): value for key, value in loaded.items()}


def strip_wrappers(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, Any],
                   prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, torch.Tensor]:
    """``tensors`` without the prefixes a wrapper put on every key (``module.`` of DataParallel...).

    A prefix goes only when every key carries it and the model's own keys do not all start with
    it (a network whose one child is called ``model`` keeps its names).
    """
    tensors = dict(tensors)
    stripped = True
    while stripped and tensors:
        stripped = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in tensors) and not all(k.startswith(prefix) for k in expected):
                tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
                stripped = True
    return tensors


def _normalization(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """rapc's own input statistics in ``module`` (its Normalize layers' buffers), set from the config."""
    return {".".join(part for part in (prefix, name, buffer) if part): getattr(layer, buffer) for name, layer in module.named_modules()
            if isinstance(layer, Normalize) for buffer in ("mean", "std")}


def _values(tensor: torch.Tensor | None) -> str:
    return "?" if tensor is None else "[" + ", ".join(f"{v:.4g}" for v in tensor.flatten().tolist()) + "]"


def _check_normalization(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str) -> None:
    """The file's copy of rapc's normalization buffers (if it has them) must be what the config sets:
    weights trained on other input statistics would see shifted inputs and lose accuracy quietly."""
    differ = [name for name, tensor in own.items() if name in given
              and (given[name].shape != tensor.shape or not torch.allclose(given[name].float(), tensor.float(), rtol=1e-5, atol=1e-6))]
    if not differ:
        return
    layer = differ[0].rpartition(".")[0]
    mean, std = given.get(f"{layer}.mean"), given.get(f"{layer}.std")
    raise RapcError(f"{source}: its input normalization {layer}.mean/std (mean {_values(mean)}, std {_values(std)}) differs from "
                    f"the model's (mean {_values(own[f'{layer}.mean'])}, std {_values(own[f'{layer}.std'])}: model.normalize, "
                    f"or the dataset's statistics when unset); if the weights were trained on theirs, set "
                    f"model.normalize={{mean: {_values(mean)}, std: {_values(std)}}}")


def fit_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a user's ``tensors`` into ``model`` (built by rapc for the config) in place.

    Wrapper prefixes are stripped. For a user network that rapc wrapped in ``Normalized``, the
    tensors are the network's own (``conv1.weight``, not ``net.conv1.weight``). rapc's
    normalization buffers come from the config; a file that has them must agree. Every
    missing, extra or mis-shaped tensor is named in one error; BatchNorm's
    ``num_batches_tracked`` may be missing (it holds no learned value).
    """
    own = _normalization(model)  # built-in models: their `normalize` layer
    target = model
    if isinstance(model, Normalized):  # the file holds the user's network, perhaps with rapc's wrapper around it
        target = model.net
        net_keys = target.state_dict()
        own = {k: v for k, v in _normalization(model.normalize, "normalize").items() if k not in net_keys}
        given = strip_wrappers(tensors, net_keys)
        file_norm = {k: given.pop(k) for k in list(given) if k in own}
        given = strip_wrappers(given, net_keys, ("net.", *WRAPPER_PREFIXES))
        _check_normalization(own, file_norm, source)
    else:
        given = strip_wrappers(tensors, model.state_dict())
        _check_normalization(own, given, source)
        given = {k: v for k, v in given.items() if k not in own}
    expected = {k: v for k, v in target.state_dict().items()
                if k not in own and not (k.endswith("num_batches_tracked") and k not in given)}
    problem = misfit(expected, given, "the model")
    if problem:
        raise RapcError(f"{source}: {problem}")
    target.load_state_dict({**target.state_dict(), **given})


def load_weights_file(model: nn.Module, path: str | Path) -> nn.Module:
    """:func:`read_weights_file` then :func:`fit_weights`: the user's weights in ``model``."""
    fit_weights(model, read_weights_file(path), str(path))
    return model
