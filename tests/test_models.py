"""The built-in models compute what their docstrings say, whatever order makes them fast."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rapc.models import LeNet


def _relu_then_pool(model: LeNet, x: torch.Tensor) -> torch.Tensor:
    """The paper's LeNet as usually written: each convolution's ReLU before its pooling."""
    x = model.pool(torch.relu(model.conv1(model.normalize(x))))
    x = model.pool(torch.relu(model.conv2(x)))
    return model.fc2(torch.relu(model.fc1(torch.flatten(x, 1))))


def _grads(logits: torch.Tensor, x: torch.Tensor, model: LeNet, y: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(F.cross_entropy(logits, y), [x, *model.parameters()]))


def test_lenet_pooling_before_relu_gives_relu_then_pool_outputs_and_gradients_bit_for_bit():
    torch.manual_seed(0)
    model = LeNet(10, 1, 28, 4, (0.1307,), (0.3081,))
    x = torch.rand(32, 1, 28, 28, requires_grad=True)
    y = torch.randint(0, 10, (32,))
    fast, reference = model(x), _relu_then_pool(model, x)
    assert torch.equal(fast, reference)
    for got, want in zip(_grads(fast, x, model, y), _grads(reference, x, model, y), strict=True):
        assert torch.equal(got, want)
    assert (model.conv1(model.normalize(x)) < 0).any()  # the ReLUs do clip: the check is not vacuous
