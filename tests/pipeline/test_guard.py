import copy

import torch

from rapc.config import AttackConfig, load_config
from rapc.data import loader
from rapc.pipeline.guard import OverfitGuard


def test_guard_flags_a_collapse_of_pgd_accuracy_but_not_a_steady_model(trained_lenet, digits):
    batch = next(iter(loader(digits.train, 128, shuffle=False)))
    guard = OverfitGuard(batch, AttackConfig(method="pgd", eps=0.02, steps=5, step=0.01), drop=0.2)
    first, collapsed = guard.check(trained_lenet)
    assert first > 0.6 and not collapsed
    assert not guard.check(trained_lenet)[1]  # the same model again: no collapse
    broken = copy.deepcopy(trained_lenet)
    with torch.no_grad():
        broken.fc2.weight.mul_(-1)  # a model whose accuracy collapses
    accuracy, collapsed = guard.check(broken)
    assert collapsed and accuracy < first - 0.2
    assert guard.best == first


def test_guard_flags_a_model_whose_pgd_accuracy_never_rose_far_below_its_fgsm_training_accuracy(trained_lenet, digits):
    """Overfit from the start, FGSM-RS leaves no peak to fall from: a model that holds no PGD at this eps
    (trained on clean inputs) is flagged on the first check when its FGSM training accuracy is high,
    and not when FGSM held as little, nor without the FGSM figure (ramp epochs)."""
    batch = next(iter(loader(digits.train, 128, shuffle=False)))
    attack = AttackConfig(method="pgd", eps=0.3, steps=10)
    pgd, collapsed = OverfitGuard(batch, attack, drop=0.2).check(trained_lenet, fgsm_accuracy=0.85)
    assert pgd < 0.2 and collapsed
    assert not OverfitGuard(batch, attack, drop=0.2).check(trained_lenet, fgsm_accuracy=pgd + 0.1)[1]
    assert not OverfitGuard(batch, attack, drop=0.2).check(trained_lenet)[1]


def test_the_guard_attacks_its_configured_images_with_its_configured_steps(digits):
    """Sized to see a collapse, not to measure: after every epoch of a fast recipe it must cost little."""
    from rapc.pipeline.trainer import RunData, _guard_attack

    cfg = load_config("digits-lenet-filter", ["attack.train.guard.images=48", "attack.train.guard.steps=4"])
    data = RunData.make(cfg, digits, torch.device("cpu"))
    assert len(data.guard_batch[0]) == len(data.guard_batch[1]) == 48
    attack = _guard_attack(cfg)
    assert (attack.steps, attack.restarts, attack.eps) == (4, 1, cfg.attack.eval.eps)
    assert attack.step_size == 2.5 * cfg.attack.eval.eps / 4
