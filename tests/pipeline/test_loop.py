import copy

import pytest
import torch

from rapc.judge import select
from rapc.config import AttackConfig, OptimizerConfig, ScheduleConfig
from rapc.data import loader
from rapc.pipeline.loop import EpochTotals, NonFinite, SavePoints, Step, make_optimizer, make_schedule, train_epoch


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_adversarial_epoch_trains_in_each_precision_and_evaluation_stays_float32(trained_lenet, digits, precision):
    model = copy.deepcopy(trained_lenet)
    data = loader(digits.train, 64, shuffle=True)
    attack = AttackConfig(method="pgd", eps=0.1, steps=3, step=0.05)
    test = loader(digits.test, 360, shuffle=False)
    judge = AttackConfig(method="pgd", eps=0.1, steps=10, step=0.02)
    before = select(model, test, judge).robust.accuracy
    optimizer = make_optimizer(model.parameters(), OptimizerConfig(name="adam", lr=2e-3))
    schedule = make_schedule(optimizer, ScheduleConfig(name="constant"), len(data), 3)
    for _ in range(3):
        stats = train_epoch(model, data, Step(optimizer, schedule, attack, precision))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    after = select(model, test, judge).robust.accuracy
    assert after > before + 0.1, (before, after)
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


def _sgd(model, steps):
    optimizer = make_optimizer(model.parameters(), OptimizerConfig(name="sgd", lr=0.01))
    return optimizer, make_schedule(optimizer, ScheduleConfig(name="constant"), steps, 1)


def _epoch(model, data, optimizer_schedule=None, **kwargs):
    optimizer, schedule = optimizer_schedule or _sgd(model, len(data))
    return train_epoch(model, data, Step(optimizer, schedule), **kwargs)


def test_a_nan_weight_stops_the_epoch_at_the_next_read_back_naming_the_step(trained_lenet, digits):
    model = copy.deepcopy(trained_lenet)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    data = loader(digits.train, 64, shuffle=False)
    with pytest.raises(NonFinite, match=rf"the training loss became nan by step {max(1, len(data) // 10)}$"):
        _epoch(model, data)


def test_save_points_checkpoint_every_n_steps_and_stop_at_the_step_after_a_stop_request(trained_lenet, digits):
    data = loader(digits.train, 64, shuffle=False)
    saved = []
    _epoch(copy.deepcopy(trained_lenet), data, save_points=SavePoints(lambda totals: saved.append(totals.steps), every=4))
    assert saved == list(range(4, len(data) + 1, 4))
    saved.clear()
    requests = iter([False, False, True])
    with pytest.raises(KeyboardInterrupt):
        _epoch(copy.deepcopy(trained_lenet), data, save_points=SavePoints(lambda totals: saved.append(totals.steps), stop=lambda step: next(requests)))
    assert saved == [3]


def test_an_epoch_continued_from_saved_totals_ends_as_an_uninterrupted_one(trained_lenet, digits):
    data = list(loader(digits.train, 64, shuffle=False))
    uninterrupted = copy.deepcopy(trained_lenet)
    whole = _epoch(uninterrupted, data)
    model = copy.deepcopy(trained_lenet)
    optimizer_schedule, saved = _sgd(model, len(data)), []
    with pytest.raises(KeyboardInterrupt):
        _epoch(model, data, optimizer_schedule, save_points=SavePoints(lambda t: saved.append(t.state_dict()), stop=lambda step: True))
    totals = EpochTotals.from_state_dict(copy.deepcopy(saved[0]), torch.device("cpu"))
    assert _epoch(model, data[totals.steps:], optimizer_schedule, totals=totals) == whole
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), uninterrupted.state_dict().values()))
