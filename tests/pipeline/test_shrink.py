import copy

import pytest
import torch

from rapc.config import LayerRule, PruningConfig, ShrinkConfig
from rapc.errors import RapcError
from rapc.models import create_model
from rapc.pipeline.masks import MaskSet
from rapc.measure import layer_stats, macs_and_params
from rapc.pipeline.projection import Projector
import rapc.pipeline.shrink as shrink_module
from rapc.pipeline.shrink import shrink


def _model(name: str, width: int, size: int, channels: int = 3):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=channels, image_size=size, width=width, mean=[0.5] * channels, std=[0.25] * channels)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong removal shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _hard_prune(model, example, cfg: PruningConfig) -> Projector:
    projector = Projector(model, example, cfg)
    params = dict(model.named_parameters())
    MaskSet(model, projector.masks({n: params[n] for n in projector.targets}, params)).apply()
    return projector


CASES = [
    ("resnet18", 2, 16, 3, PruningConfig(scheme="filter", ratio=0.5)),
    ("vgg16_bn", 2, 16, 3, PruningConfig(scheme="filter", ratio=0.5)),
    ("lenet", 4, 28, 1, PruningConfig(scheme="filter", ratio=0.5)),
    ("resnet18", 2, 16, 3, PruningConfig(scheme="channel", ratio=0.5)),
    ("lenet", 4, 28, 1, PruningConfig(scheme="channel", ratio=0.5)),
]


@pytest.mark.parametrize("name, width, size, channels, cfg", CASES, ids=lambda c: getattr(c, "scheme", c))
def test_shrunk_model_equals_the_masked_model_and_is_smaller(name, width, size, channels, cfg):
    model = _model(name, width, size, channels)
    batch = torch.rand(16, channels, size, size)
    _hard_prune(model, batch, cfg)
    result = shrink(model, batch, ShrinkConfig())
    with torch.no_grad():
        diff = (model(batch) - result.model(batch)).abs().max()
    assert diff <= 1e-5 and result.max_abs_diff == pytest.approx(float(diff), abs=1e-7)
    macs_before, params_before = macs_and_params(model, batch)
    macs_after, params_after = macs_and_params(result.model, batch)
    assert macs_after < 0.6 * macs_before and params_after < 0.6 * params_before
    assert sum(result.removed.values()) > 0 and result.history
    if cfg.scheme == "filter":  # every zero filter became a removed channel
        assert all(s.zeros == 0 for s in layer_stats(result.model) if s.name != "conv1" or name != "lenet")


def test_column_pruning_removes_whole_channel_columns_and_keeps_the_rest_as_zeros():
    model = _model("lenet", 4, 28, 1)
    batch = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        model.conv2.weight[:, 3] *= 0.01  # every column of input channel 3 ranks last
    _hard_prune(model, batch, PruningConfig(scheme="column", ratio=0.9))
    conv2 = model.conv2.weight
    dead_inputs = int((conv2.transpose(0, 1).flatten(1).abs().sum(1) == 0).sum())
    result = shrink(model, batch, ShrinkConfig())
    assert result.model.conv2.in_channels == 8 - dead_inputs and dead_inputs > 0
    assert layer_stats(result.model)[1].zeros > 0  # partial columns stay zeros
    with torch.no_grad():
        assert torch.allclose(model(batch), result.model(batch), atol=1e-5)


def test_shrink_round_to_keeps_zero_channels_so_widths_are_multiples_of_eight_and_stays_exact():
    model = _model("resnet18", 4, 16)  # 16..128 channels
    batch = torch.rand(8, 3, 16, 16)
    _hard_prune(model, batch, PruningConfig(scheme="filter", ratio=0.6))
    result = shrink(model, batch, ShrinkConfig(round_to=8))
    for m in result.model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.in_channels != 3:
            assert m.out_channels % 8 == 0 and m.in_channels % 8 == 0
    assert any("round_to=8" in note for note in result.kept_zero)
    assert result.max_abs_diff <= 1e-5


@pytest.mark.parametrize("name, width, size, channels", [("resnet18", 4, 16, 3), ("lenet", 8, 28, 1)])
def test_pruning_round_to_shrinks_to_widths_multiples_of_n_with_no_zeros_kept(name, width, size, channels):
    """The projection chose a multiple of 8 channels, so torch-pruning removes every zero channel and the widths are multiples."""
    model = _model(name, width, size, channels)  # resnet18: 16..128 channels; lenet: conv 16, 32, fc 512
    batch = torch.rand(8, channels, size, size)
    plain = copy.deepcopy(model)
    _hard_prune(plain, batch, PruningConfig(scheme="filter", ratio=0.6))
    unrounded = shrink(plain, batch, ShrinkConfig()).model
    _hard_prune(model, batch, PruningConfig(scheme="filter", ratio=0.6, round_to=8))
    result = shrink(model, batch, ShrinkConfig())

    def widths(m):
        return [(n, l.weight.shape[0], l.weight.shape[1]) for n, l in m.named_modules() if isinstance(l, (torch.nn.Conv2d, torch.nn.Linear))]

    assert any(out % 8 for _, out, _ in widths(unrounded)[:-1])  # else this case could not tell rounding from none
    for layer, out, inputs in widths(result.model)[:-1]:  # the output layer's rows are the classes
        assert out % 8 == 0, (layer, out)
        if isinstance(result.model.get_submodule(layer), torch.nn.Conv2d) and inputs != channels:
            assert inputs % 8 == 0, (layer, inputs)
    assert widths(result.model)[-1][1] == 10
    assert all(s.zeros == 0 for s in layer_stats(result.model) if s.name != "conv1" or name != "lenet")  # no zeros kept for rounding
    assert not result.kept_zero and result.max_abs_diff <= 1e-5
    macs = macs_and_params(result.model, batch)[0]
    assert macs_and_params(unrounded, batch)[0] < macs < macs_and_params(model, batch)[0]  # rounded up: a little wider


def test_zero_filters_coupled_to_a_live_layer_are_reported_not_removed():
    model = _model("resnet18", 2, 16)
    batch = torch.rand(8, 3, 16, 16)
    # Only one producer of the stage-1 residual group is pruned: its zero filters are not removable.
    cfg = PruningConfig(scheme="filter", ratio=0.5, layers=[LayerRule(pattern="*", scheme="irregular", ratio=0.0), LayerRule(pattern="layer1.0.conv2", scheme="filter", ratio=0.5)])
    _hard_prune(model, batch, cfg)
    result = shrink(model, batch, ShrinkConfig())
    assert result.model.layer1[0].conv2.out_channels == 8
    assert any("layer1.0.conv2" in note and "live in a coupled layer" in note for note in result.kept_zero)
    assert result.max_abs_diff <= 1e-5


def test_a_live_zero_filter_is_kept_and_a_non_exact_shrink_fails_loudly(monkeypatch):
    model = _model("lenet", 4, 28, 1)
    batch = torch.rand(8, 1, 28, 28)
    _hard_prune(model, batch, PruningConfig(scheme="filter", ratio=0.5))
    with torch.no_grad():  # zero filters whose bias still emits a constant are live, so they stay
        model.conv2.bias[~model.conv2.weight.flatten(1).any(1)] = 0.3
    assert shrink(model, batch, ShrinkConfig()).model.conv2.out_channels == 16
    # Force the removal of live channels: the output check must catch it.
    monkeypatch.setattr(shrink_module, "dead_channels", lambda group, params: (torch.arange(group.size) > 0, []))
    with pytest.raises(RapcError, match="not exact"):
        shrink(model, batch, ShrinkConfig())


def test_a_torchvision_user_model_is_projected_and_shrunk_exactly():
    from rapc.models import create_model as create

    torch.manual_seed(0)
    model = create("torchvision.models:resnet18", allow_import=True, num_classes=10, in_channels=3, image_size=32, width=16, mean=[0.5] * 3, std=[0.25] * 3).eval()
    batch = torch.rand(4, 3, 32, 32)
    projector = _hard_prune(model, batch, PruningConfig(scheme="filter", ratio=0.5))
    assert "net.fc.weight" not in projector.targets and "net.layer4.1.conv2.weight" in projector.targets
    result = shrink(model, batch, ShrinkConfig())
    assert result.max_abs_diff <= 1e-4
    assert result.model.net.layer4[1].conv2.out_channels == 256
