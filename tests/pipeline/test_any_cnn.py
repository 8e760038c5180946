"""Filter and channel pruning of networks rapc did not write: torchvision's ResNet-18 and MobileNetV2
through `module:factory`, and a user net with a depthwise separable block, a concat of two branches,
and two squeeze-excitation gates (1x1 convs; linears with a view). Projection, hard prune and shrink
must be exact and really smaller, the saved model must load back, and a grouped conv is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rapc.config import LayerRule, PruningConfig, ShrinkConfig
from rapc.errors import RapcError
from rapc.modelio import Architecture, load_model, save_model
from rapc.models import create_model
from rapc.pipeline.masks import hard_prune
from rapc.pipeline.projection import Projector
from rapc.pipeline.shrink import shrink

ARGS = {"num_classes": 10, "in_channels": 3, "image_size": 32, "width": 16, "mean": [0.5] * 3, "std": [0.25] * 3}


class ConvSE(nn.Module):
    """Squeeze-excitation with 1x1 convs: the expand conv's outputs are tied to the map they scale."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class LinearSE(nn.Module):
    """Squeeze-excitation with linears and a view(b, c, 1, 1), as in the SENet paper's code."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, reduced)
        self.fc2 = nn.Linear(reduced, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * gate.view(x.shape[0], -1, 1, 1)


class UserNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pointwise = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.gate1 = ConvSE(24, 6)
        self.left = nn.Conv2d(24, 8, 3, padding=1)
        self.right = nn.Conv2d(24, 12, 1)
        self.fuse = nn.Sequential(nn.Conv2d(20, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.gate2 = LinearSE(32, 8)  # its view(b, c, 1, 1) shares a channel group with the flatten below
        self.fc = nn.Linear(32 * 2 * 2, num_classes)  # flattens a 2x2 map: four inputs per channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate1(self.pointwise(self.depthwise(self.stem(x))))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)
        x = self.gate2(self.fuse(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))


def user_net(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return UserNet(num_classes, in_channels)


BUILDERS = {"resnet18": "torchvision.models:resnet18", "mobilenet_v2": "torchvision.models:mobilenet_v2", "user": f"{__name__}:user_net"}


def _model(builder: str) -> nn.Module:
    """Random weights; BatchNorm statistics measured on random images and random affine parameters,
    so outputs depend on the input and a wrong removal shows."""
    torch.manual_seed(0)
    model = create_model(builder, allow_import=True, **ARGS)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        model(torch.rand(16, 3, 32, 32))
    return model.eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _zero_channels(model: nn.Module) -> list[str]:
    """Conv/linear layers that still hold an all-zero filter or input channel."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            if not w.flatten(1).any(1).all():
                found.append(f"{name} filter")
            if w.shape[1] > 1 and not w.transpose(0, 1).flatten(1).any(1).all():
                found.append(f"{name} input")
    return found


@pytest.mark.parametrize("scheme", ["filter", "channel"])
@pytest.mark.parametrize("net", list(BUILDERS))
def test_projected_model_shrinks_exactly_and_loads_back(net, scheme, tmp_path):
    builder = BUILDERS[net]
    model = _model(builder)
    batch = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        dense_out = model(batch)
    dense_params = _params(model)
    projector = Projector(model, batch, PruningConfig(scheme=scheme, ratio=0.5))
    hard_prune(model, projector)
    result = shrink(model, batch, ShrinkConfig())
    with torch.no_grad():
        masked, shrunk = model(batch), result.model(batch)
    assert (masked - dense_out).abs().max() > 1e-2  # the projection pruned something that matters
    assert (masked[0] - masked[1]).abs().max() > 1e-3  # outputs depend on the input
    assert (masked - shrunk).abs().max() <= 1e-4
    assert _params(result.model) < 0.6 * dense_params
    # Every zero channel the projection made was removed; only the network input's channels stay.
    assert result.kept_zero == []
    first_conv = next(n for n, m in result.model.named_modules() if isinstance(m, nn.Conv2d))
    assert _zero_channels(result.model) == ([f"{first_conv} input"] if scheme == "channel" else [])

    save_model(result.model, Architecture(builder, ARGS, [3, 32, 32], result.history), tmp_path)
    loaded = load_model(tmp_path, allow_import=True)
    with torch.no_grad():
        assert torch.equal(loaded(batch), shrunk)


def test_channel_scheme_prunes_a_depthwise_conv_with_the_pointwise_conv_that_reads_it():
    model = _model(BUILDERS["user"])
    projector = Projector(model, torch.rand(2, 3, 32, 32), PruningConfig(scheme="channel", ratio=0.5))
    assert "net.depthwise.0.weight" in projector.targets
    assert not any(note.startswith("net.depthwise.0") for note in projector.notes)
    params = dict(model.named_parameters())
    masks = projector.masks({n: params[n] for n in projector.targets})
    depthwise = masks["net.depthwise.0.weight"].flatten(1).all(1)  # filter c reads input c only
    pointwise = masks["net.pointwise.0.weight"].transpose(0, 1).flatten(1).all(1)
    assert torch.equal(depthwise, pointwise) and int(depthwise.sum()) == 8


def test_se_gate_expand_filters_are_pruned_with_the_feature_map_they_scale():
    model = _model(BUILDERS["user"])
    projector = Projector(model, torch.rand(2, 3, 32, 32), PruningConfig(scheme="filter", ratio=0.5))
    params = dict(model.named_parameters())
    masks = projector.masks({n: params[n] for n in projector.targets}, params)
    for gate, source in (("net.gate1.expand", "net.pointwise.0"), ("net.gate2.fc2", "net.fuse.0")):
        kept = masks[f"{gate}.weight"].flatten(1).any(1)
        assert torch.equal(kept, masks[f"{source}.weight"].flatten(1).any(1))
        assert torch.equal(masks[f"{gate}.bias"], kept)


class DepthwiseResidual(nn.Module):
    """x + bn(dw(x)): the stem's channels are read by the add too, so a zero depthwise filter does not free them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.fc((x + self.bn(self.dw(x))).mean((2, 3)))


def test_zero_depthwise_filters_are_removed_when_only_that_conv_reads_their_input_channels():
    only_dw = PruningConfig(scheme="irregular", ratio=0.0, layers=[LayerRule(pattern="*depthwise.0", scheme="filter", ratio=0.5)])
    model = _model(BUILDERS["user"])
    batch = torch.rand(2, 3, 32, 32)
    hard_prune(model, Projector(model, batch, only_dw))
    result = shrink(model, batch, ShrinkConfig())
    assert result.model.net.stem[0].out_channels == 8 and result.model.net.depthwise[0].out_channels == 8
    assert result.kept_zero == [] and result.max_abs_diff <= 1e-4

    torch.manual_seed(0)
    model = DepthwiseResidual().eval()
    hard_prune(model, Projector(model, batch, PruningConfig(scheme="irregular", ratio=0.0, layers=[LayerRule(pattern="dw", scheme="filter", ratio=0.5)])))
    result = shrink(model, batch, ShrinkConfig())
    assert result.model.dw.out_channels == 8 and result.max_abs_diff <= 1e-4
    assert any("zero filters of dw are live" in note for note in result.kept_zero)


class Grouped(nn.Module):
    def __init__(self, groups: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, out_channels, 3, padding=1, groups=groups)
        self.fc = nn.Linear(out_channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 1).flatten(1))


@pytest.mark.parametrize("groups, out_channels, reason", [
    (4, 32, r"layer conv2: grouped convolution \(groups=4, in_channels=16, out_channels=32\) cannot be pruned exactly"),
    (16, 32, r"layer conv2: depthwise convolution with channel multiplier 2 \(groups=16, in_channels=16, out_channels=32\) cannot be pruned exactly"),
])
def test_a_grouped_conv_that_is_not_depthwise_is_refused_in_one_line(groups, out_channels, reason):
    model = Grouped(groups, out_channels).eval()
    batch = torch.rand(2, 3, 8, 8)
    for attempt in (lambda: Projector(model, batch, PruningConfig(scheme="filter", ratio=0.5)), lambda: shrink(model, batch, ShrinkConfig())):
        with pytest.raises(RapcError, match=reason) as info:
            attempt()
        assert "\n" not in str(info.value)


class Unflatten(nn.Module):
    """A linear's 64 outputs viewed as 16 channels of 2x2: torch-pruning cannot map them onto the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 8 * 8, 16 * 2 * 2)
        self.conv = nn.Conv2d(16, 8, 1)
        self.fc2 = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1))).view(x.shape[0], 16, 2, 2)
        return self.fc2(torch.relu(self.conv(x)).flatten(1))


def test_a_reshape_whose_channels_cannot_be_mapped_is_refused_in_one_line():
    with pytest.raises(RapcError, match=r"layer conv: torch-pruning maps the 64 channels of fc1 onto 64 input positions .* of a layer with 16") as info:
        Projector(Unflatten().eval(), torch.rand(2, 3, 8, 8), PruningConfig(scheme="filter", ratio=0.5))
    assert "\n" not in str(info.value)
