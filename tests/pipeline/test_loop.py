import copy

import pytest
import torch

from rapc.attacks import evaluate
from rapc.config import AttackConfig, OptimizerConfig, ScheduleConfig
from rapc.data import loader
from rapc.pipeline.loop import make_optimizer, make_schedule, train_epoch


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_adversarial_epoch_trains_in_each_precision_and_evaluation_stays_float32(trained_lenet, digits, precision):
    model = copy.deepcopy(trained_lenet)
    data = loader(digits.train, 64, shuffle=True)
    attack = AttackConfig(method="pgd", eps=0.1, steps=3, step=0.05)
    test = loader(digits.test, 360, shuffle=False)
    before = evaluate(model, test, AttackConfig(method="pgd", eps=0.1, steps=10, step=0.02), torch.device("cpu"))
    optimizer = make_optimizer(model.parameters(), OptimizerConfig(name="adam", lr=2e-3))
    schedule = make_schedule(optimizer, ScheduleConfig(name="constant"), len(data), 3)
    for _ in range(3):
        stats = train_epoch(model, data, optimizer, schedule, attack=attack, device=torch.device("cpu"), precision=precision)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    after = evaluate(model, test, AttackConfig(method="pgd", eps=0.1, steps=10, step=0.02), torch.device("cpu"))
    assert after["robust"] > before["robust"] + 0.1, (before, after)
    assert 0 < stats["loss"] < 3 and 0 < stats["train_acc"] <= 1


def test_schedules_warm_up_then_follow_their_shape():
    param = [torch.nn.Parameter(torch.zeros(1))]
    factors = {}
    for name in ("constant", "cosine", "step"):
        optimizer = make_optimizer(param, OptimizerConfig(name="sgd", lr=1.0))
        schedule = make_schedule(optimizer, ScheduleConfig(name=name, warmup_epochs=1, milestones=[2], gamma=0.1), steps_per_epoch=10, epochs=4)
        lrs = []
        for _ in range(40):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        factors[name] = lrs
    for lrs in factors.values():
        assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up over epoch 1
    assert factors["constant"][-1] == 1.0
    assert factors["cosine"][-1] < 0.01 and factors["cosine"] [10:] == sorted(factors["cosine"][10:], reverse=True)
    assert factors["step"][19] == 1.0 and factors["step"][20] == pytest.approx(0.1)
