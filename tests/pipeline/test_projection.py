import pytest
import torch

from rapc.config import LayerRule, PruningConfig
from rapc.models import create_model
from rapc.pipeline.projection import Projector, layer_plans


def _resnet(width: int = 2):
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=10, in_channels=3, image_size=16, width=width, mean=[0.5] * 3, std=[0.25] * 3)


def _lenet(width: int = 2, size: int = 8):
    torch.manual_seed(0)
    return create_model("lenet", num_classes=10, in_channels=1, image_size=size, width=width, mean=[0.5], std=[0.25])


def _kept_filters(mask: torch.Tensor) -> set[int]:
    return set(mask.flatten(1).any(1).nonzero().squeeze(1).tolist())


def test_residual_coupled_filters_are_pruned_at_the_same_indices():
    model = _resnet()
    projector = Projector(model, torch.rand(2, 3, 16, 16), PruningConfig(scheme="filter", ratio=0.5))
    params = dict(model.named_parameters())
    masks = projector.masks({n: params[n] for n in projector.targets})
    # The stem conv and every block's second conv in stage 1 feed one chain of residual adds.
    coupled = ["conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight"]
    kept = [_kept_filters(masks[n]) for n in coupled]
    assert kept[0] == kept[1] == kept[2] and len(kept[0]) == 4  # 8 channels at w=2, half kept
    # Stage 2 is tied to its downsample conv.
    assert _kept_filters(masks["layer2.0.downsample.0.weight"]) == _kept_filters(masks["layer2.0.conv2.weight"])
    # An uncoupled conv is ranked on its own.
    assert len(_kept_filters(masks["layer1.0.conv1.weight"])) == 4


def test_group_ranking_uses_the_joint_norm_of_all_coupled_filters():
    model = _resnet()
    with torch.no_grad():
        for name in ("conv1", "layer1.0.conv2", "layer1.1.conv2"):
            model.get_submodule(name).weight.fill_(0.01)
        model.layer1[1].conv2.weight[5].fill_(1.0)  # channel 5 is large in one member only
        model.conv1.weight[2].fill_(1.0)
    projector = Projector(model, torch.rand(2, 3, 16, 16), PruningConfig(scheme="filter", ratio=0.75))
    params = dict(model.named_parameters())
    masks = projector.masks({n: params[n] for n in projector.targets})
    assert _kept_filters(masks["layer1.0.conv2.weight"]) == {2, 5}


def test_hard_prune_masks_zero_bias_and_batchnorm_of_pruned_filters():
    model = _resnet()
    projector = Projector(model, torch.rand(2, 3, 16, 16), PruningConfig(scheme="filter", ratio=0.5))
    params = dict(model.named_parameters())
    masks = projector.masks({n: params[n] for n in projector.targets}, params)
    kept = _kept_filters(masks["layer1.0.conv1.weight"])
    for name in ("layer1.0.bn1.weight", "layer1.0.bn1.bias"):
        assert set(masks[name].nonzero().squeeze(1).tolist()) == kept
    assert set(masks["bn1.bias"].nonzero().squeeze(1).tolist()) == _kept_filters(masks["conv1.weight"])

    lenet = _lenet()
    projector = Projector(lenet, torch.rand(2, 1, 8, 8), PruningConfig(scheme="filter", ratio=0.5))
    params = dict(lenet.named_parameters())
    masks = projector.masks({n: params[n] for n in projector.targets}, params)
    assert set(masks["conv2.bias"].nonzero().squeeze(1).tolist()) == _kept_filters(masks["conv2.weight"])


def test_output_layer_is_never_filter_pruned_and_the_note_says_so():
    model = _lenet()
    projector = Projector(model, torch.rand(2, 1, 8, 8), PruningConfig(scheme="filter", ratio=0.5))
    assert "fc2.weight" not in projector.targets
    assert any(note.startswith("fc2: output layer") for note in projector.notes)


def test_channel_scheme_on_a_linear_after_flatten_prunes_whole_conv_channels():
    model = _lenet(width=2, size=8)  # conv2 has 8 channels of 2x2 = 32 fc1 inputs
    projector = Projector(model, torch.rand(2, 1, 8, 8), PruningConfig(scheme="channel", ratio=0.5, layers=[LayerRule(pattern="conv*", scheme="irregular")]))
    params = dict(model.named_parameters())
    mask = projector.masks({n: params[n] for n in projector.targets})["fc1.weight"]
    columns = mask.any(0).view(8, 4)  # per conv2 channel, its 4 flattened positions
    assert (columns.all(1) | ~columns.any(1)).all()  # all or nothing per channel
    assert int(columns.all(1).sum()) == 4


def test_rules_override_by_glob_and_keep_dense_wins():
    model = _resnet()
    cfg = PruningConfig(
        scheme="filter", ratio=0.5,
        layers=[LayerRule(pattern="layer4.*", ratio=0.75), LayerRule(pattern="layer3.*conv1", scheme="column")],
        keep_dense=["layer1.*", "fc"],
    )
    plans = layer_plans(model, cfg)
    assert plans["layer4.0.conv1"].ratio == 0.75 and plans["layer4.0.conv1"].scheme == "filter"
    assert plans["layer3.1.conv1"].scheme == "column" and plans["layer3.1.conv2"].scheme == "filter"
    assert not any(name.startswith("layer1.") for name in plans) and "fc" not in plans


def test_nm_layers_with_too_few_input_channels_stay_dense_with_a_note():
    model = _lenet()
    projector = Projector(model, torch.rand(2, 1, 8, 8), PruningConfig(scheme="nm"))
    assert "conv1.weight" not in projector.targets and "conv2.weight" in projector.targets
    assert any(note.startswith("conv1: 1 input channels") for note in projector.notes)
    params = dict(model.named_parameters())
    mask = projector.masks({n: params[n] for n in projector.targets})["conv2.weight"]
    assert mask.float().mean() == pytest.approx(0.5)


def test_a_ratio_that_would_prune_every_filter_keeps_one_and_says_so():
    model = _lenet(width=2)  # conv1 has 4 filters: ratio 0.9 rounds to none kept
    projector = Projector(model, torch.rand(2, 1, 8, 8), PruningConfig(scheme="filter", ratio=0.9))
    assert any(note.startswith("conv1: ratio 0.9 would prune all 4 channels; 1 is kept") for note in projector.notes)
    params = dict(model.named_parameters())
    masks = projector.masks({n: params[n] for n in projector.targets})
    assert len(_kept_filters(masks["conv1.weight"])) == 1


# --- pruning.round_to ---------------------------------------------------------------------------


def _kept(mask: torch.Tensor, dim: int) -> int:
    """Output (dim 0) or input (dim 1) channels a mask keeps any weight of."""
    return int(mask.transpose(0, dim).flatten(1).any(1).sum())


ROUNDED = [  # a model, its input and a ratio at which no group's unrounded kept count is a multiple of N
    ("lenet w=8, filter", lambda: _lenet(width=8, size=28), (1, 28, 28), "filter", 0.7, 8),
    ("resnet18 w=2, filter (residual groups)", lambda: _resnet(width=2), (3, 16, 16), "filter", 0.6, 4),
    ("resnet18 w=2, channel", lambda: _resnet(width=2), (3, 16, 16), "channel", 0.6, 4),
]


@pytest.mark.parametrize("make, shape, scheme, ratio, n", [case[1:] for case in ROUNDED], ids=[case[0] for case in ROUNDED])
def test_round_to_keeps_a_multiple_of_n_channels_in_every_group_in_admm_and_the_hard_prune(make, shape, scheme, ratio, n):
    from rapc.pipeline.admm import AdmmState
    from rapc.pipeline.masks import hard_prune

    model, example = make(), torch.rand(2, *shape)
    dim = 0 if scheme == "filter" else 1
    rounded = Projector(model, example, PruningConfig(scheme=scheme, ratio=ratio, round_to=n))
    plain = Projector(model, example, PruningConfig(scheme=scheme, ratio=ratio))
    params = dict(model.named_parameters())
    # Layers whose channels are removable (the first conv's inputs are the image's: zeroed per layer, not a group).
    grouped = [p for p in rounded.targets if dim == 0 or model.get_submodule(p.removesuffix(".weight")).weight.shape[1] != shape[0]]
    unrounded = {p: _kept(m, dim) for p, m in plain.masks({p: params[p] for p in plain.targets}).items() if p in grouped}
    assert any(k % n for k in unrounded.values()), unrounded  # else this case could not tell rounding from none

    z = AdmmState.start(params, rounded, rho=0.1).z  # ADMM's Z-update projects with the same masks
    masks = hard_prune(model, rounded).masks
    for p in grouped:
        size = params[p].shape[dim]  # channels: no flatten of a spatial map feeds these cases' linears
        kept = _kept(masks[p], dim)
        assert kept % n == 0 or kept == size, (p, kept)
        assert unrounded[p] <= kept < unrounded[p] + n  # rounded up, never pruning more than the ratio asks
        assert _kept(z[p] != 0, dim) == kept and _kept(params[p].detach() != 0, dim) == kept
    assert any(note.startswith(f"pruning.round_to={n}: every pruned channel group keeps a multiple of {n}") for note in rounded.notes)


def test_round_to_leaves_a_group_narrower_than_n_whole_and_a_ratio_of_one_keeps_n():
    model = _lenet(width=2)  # conv1 4 filters, conv2 8
    projector = Projector(model, torch.rand(2, 1, 8, 8), PruningConfig(scheme="filter", ratio=0.9, round_to=8))
    params = dict(model.named_parameters())
    masks = projector.masks({n: params[n] for n in projector.targets})
    assert _kept(masks["conv1.weight"], 0) == 4 and _kept(masks["conv2.weight"], 0) == 8  # 8 kept of 8; all 4 of 4
    assert any(note.startswith("conv1: ratio 0.9 would prune all 4 channels; 4 are kept") for note in projector.notes)
    assert any("conv1 4/4 (the ratio alone: 1), conv2 8/8 (the ratio alone: 1)" in note for note in projector.notes)
