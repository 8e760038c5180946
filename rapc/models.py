"""Model registry. Every model takes images in [0, 1] and normalizes them in its
first layer, so the network that is trained, attacked, exported and served is
one function of pixel space.

The width multiplier ``width`` follows the paper: w=16 is the standard network
(LeNet conv 1->32->64, ResNet-18 64..512 channels); a smaller w trained from
scratch is the baseline that pruning must beat.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rapc.errors import RapcError
from rapc.registry import Registry

MODELS: Registry = Registry("model")


class Normalize(nn.Module):
    """(x - mean) / std per channel, as a layer so exported graphs carry it."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@MODELS.register("lenet")
class LeNet(nn.Module):
    """The paper's MNIST family: conv5x5 c->2w, conv5x5 2w->4w, fc 4w*(s/4)^2 -> 64w, fc 64w -> classes."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int, mean, std) -> None:
        super().__init__()
        if image_size % 4:
            raise RapcError(f"lenet needs an image size divisible by 4 (two 2x2 poolings), got {image_size}")
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 2 * width, 5, padding=2)
        self.conv2 = nn.Conv2d(2 * width, 4 * width, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(4 * width * (image_size // 4) ** 2, 64 * width)
        self.fc2 = nn.Linear(64 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pooling before ReLU computes exactly relu-then-pool (both are monotone; outputs and input
        # gradients equal bit for bit) with ReLU and its backward on a quarter of the activations:
        # 1.2x faster attack passes on CPU, where these element-wise ops cost as much as a convolution.
        x = torch.relu(self.pool(self.conv1(self.normalize(x))))
        x = torch.relu(self.pool(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


@MODELS.register("resnet18")
class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool), stage widths 4w/8w/16w/32w."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int, mean, std) -> None:
        super().__init__()
        widths = [4 * width, 8 * width, 16 * width, 32 * width]
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


_VGG16 = [4, 4, "M", 8, 8, "M", 16, 16, 16, "M", 32, 32, 32, "M", 32, 32, 32, "M"]


@MODELS.register("vgg16_bn")
class VGG16BN(nn.Module):
    """CIFAR-style VGG-16 with BatchNorm (64..512 channels at w=16); pools stop at 1x1 for small inputs."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int, mean, std) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        for v in _VGG16:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            cout = int(v) * width
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(self.normalize(x)))
        return self.classifier(torch.flatten(x, 1))


class Normalized(nn.Module):
    """A user network with rapc's normalization in front."""

    def __init__(self, net: nn.Module, mean, std) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _import_factory(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RapcError(f"model {path!r}: cannot import it ({exc})") from None
    if not callable(factory):
        raise RapcError(f"model {path!r} is not callable")
    return factory


def _takes(factory: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and C extensions may have no signature
        return False


def create_model(builder: str, *, allow_import: bool = False, **args: Any) -> nn.Module:
    """Build a registered model, or a user factory ``package.module:factory``.

    A user factory is called as ``factory(num_classes=..., **model.kwargs)``, plus
    ``in_channels=...`` when its signature takes it (torchvision's factories do not);
    importing it runs arbitrary code, hence ``allow_import``.

    ``mean`` and ``std`` None (``model.normalize: none``): no normalization. A user network is
    then returned as it is, so its state-dict keys are the user's own; a built-in keeps its
    ``normalize`` layer as the identity (mean 0, std 1), so its keys do not depend on the setting.
    """
    if ":" in builder:
        if not allow_import:
            raise RapcError(
                f"model {builder!r} is a Python import path; importing runs its code, set model.allow_import=true to allow it"
            )
        factory = _import_factory(builder)
        mean, std = args.pop("mean"), args.pop("std")
        for unused in ("image_size", "width"):
            args.pop(unused, None)
        if not _takes(factory, "in_channels"):
            args.pop("in_channels", None)
        try:
            net = factory(**args)
        except TypeError as exc:
            raise RapcError(f"model {builder!r}: bad arguments ({exc}); check model.kwargs") from None
        if not isinstance(net, nn.Module):
            raise RapcError(f"model {builder!r} returned {type(net).__name__}, not a torch.nn.Module")
        return net if mean is None else Normalized(net, mean, std)
    if "mean" in args and args["mean"] is None and "in_channels" in args:
        args["mean"], args["std"] = [0.0] * args["in_channels"], [1.0] * args["in_channels"]
    try:
        return MODELS.get(builder)(**args)
    except TypeError as exc:
        raise RapcError(f"model {builder}: bad arguments ({exc})") from None
