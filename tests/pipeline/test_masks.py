import pytest
import torch

from rapc.config import AttackConfig, OptimizerConfig, ScheduleConfig
from rapc.data import loader
from rapc.pipeline.loop import Step, make_optimizer, make_schedule, train_epoch
from rapc.pipeline.masks import MaskSet
from rapc.schemes import irregular_mask


@pytest.mark.parametrize(
    "optimizer",
    [
        OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
        OptimizerConfig(name="adam", lr=0.01, weight_decay=1e-4),
        OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.1),
    ],
)
def test_masked_adversarial_retraining_keeps_pruned_weights_exactly_zero(trained_lenet, digits, optimizer):
    model = __import__("copy").deepcopy(trained_lenet).train()
    masks = {n: irregular_mask(p, 0.7) for n, p in model.named_parameters() if n.endswith("weight")}
    maskset = MaskSet(model, masks)
    maskset.apply()
    data = loader(digits.train, 64, shuffle=True)
    opt = make_optimizer(model.parameters(), optimizer)
    # A dense step first fills the optimizer state of every weight, pruned ones too: masking must still hold.
    x, y = next(iter(data))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    maskset.apply()
    schedule = make_schedule(opt, ScheduleConfig(name="cosine"), len(data), 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_epoch(model, data, Step(opt, schedule, AttackConfig(method="pgd", eps=0.05, steps=2),
                                  hooks=maskset.hooks()))
    for name, p in model.named_parameters():
        if name in masks:
            assert torch.all(p[~masks[name]] == 0), name
            assert not torch.equal(p[masks[name]], before[name][masks[name]]), f"{name} did not train"
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                assert torch.isfinite(value).all()


def test_without_grad_masking_momentum_would_resurrect_pruned_weights(trained_lenet, digits):
    """The check above is meaningful: masking weights only once leaves them non-zero after steps."""
    model = __import__("copy").deepcopy(trained_lenet).train()
    masks = {n: irregular_mask(p, 0.7) for n, p in model.named_parameters() if n.endswith("weight")}
    MaskSet(model, masks).apply()
    opt = make_optimizer(model.parameters(), OptimizerConfig(name="sgd", lr=0.05, momentum=0.9))
    for x, y in loader(digits.train, 64, shuffle=True):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert any((p[~masks[n]] != 0).any() for n, p in model.named_parameters() if n in masks)
