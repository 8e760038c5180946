import pytest
import torch

from rapc.attacks import attack_batch, frozen_bn_stats, perturb, pgd, robust_correct
from rapc.judge import select
from rapc.config import AttackConfig
from rapc.data import loader
from rapc.models import create_model


def _accuracy(model, x, y, attack: AttackConfig, seed: int = 0) -> float:
    torch.manual_seed(seed)
    return float(robust_correct(model, x, y, attack).float().mean())


def test_trained_model_is_accurate_on_clean_digits(trained_lenet, digits_batch):
    x, y = digits_batch
    assert _accuracy(trained_lenet, x, y, AttackConfig(method="none")) > 0.9


def test_pgd_lowers_accuracy_more_than_fgsm(trained_lenet, digits_batch):
    x, y = digits_batch
    clean = _accuracy(trained_lenet, x, y, AttackConfig(method="none"))
    fgsm = _accuracy(trained_lenet, x, y, AttackConfig(method="fgsm", eps=0.1))
    pgd20 = _accuracy(trained_lenet, x, y, AttackConfig(method="pgd", eps=0.1, steps=20, step=0.01))
    assert fgsm < clean - 0.1
    assert pgd20 < fgsm - 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_more_steps_or_restarts_never_raise_robust_accuracy(trained_lenet, digits_batch, seed):
    x, y = digits_batch
    figures = [
        _accuracy(trained_lenet, x, y, AttackConfig(method="pgd", eps=0.05, steps=steps, step=0.01, restarts=restarts), seed)
        for steps, restarts in [(2, 1), (5, 1), (10, 1), (10, 3)]
    ]
    assert figures == sorted(figures, reverse=True), figures
    assert figures[-1] < figures[0]


def test_adversarial_examples_stay_in_the_eps_ball_and_pixel_range(trained_lenet, digits_batch):
    x, y = digits_batch
    x_adv = pgd(trained_lenet, x, y, eps=0.1, step=0.05, steps=5)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).any()


def _pgd_two_clamps(model, x, y, *, eps, step, steps, random_start, keep_fooled):
    """pgd() as first written: the eps-ball and the pixel range clamped one after the other."""
    delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
    delta = (x + delta).clamp_(0, 1) - x
    with frozen_bn_stats(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), delta)
            with torch.no_grad():
                move = step * grad.sign()
                if keep_fooled:
                    move *= (logits.argmax(1) == y).view(-1, 1, 1, 1)
                delta = (delta + move).clamp_(-eps, eps)
                delta = (x + delta).clamp_(0, 1) - x
    return (x + delta).detach()


@pytest.mark.parametrize("random_start", [True, False])
@pytest.mark.parametrize("keep_fooled", [True, False])
def test_one_clamp_to_the_box_intersection_gives_the_adversarial_examples_of_two_clamps(trained_lenet, digits_batch, random_start, keep_fooled):
    x, y = digits_batch
    x = x[:64].clone()
    x[:, :, :2] = 0.0  # pixels on both edges of [0, 1], where the pixel range binds before the eps-ball
    x[:, :, -2:] = 1.0
    examples = []
    for attack in (pgd, _pgd_two_clamps):
        torch.manual_seed(3)
        examples.append(attack(trained_lenet, x, y[:64], eps=0.3, step=0.1, steps=5, random_start=random_start, keep_fooled=keep_fooled))
    fused, two_clamps = examples
    torch.testing.assert_close(fused, two_clamps, rtol=0, atol=1e-6)
    assert (fused - x).abs().max() > 0.29 and fused.min() == 0 and fused.max() == 1  # both bounds were reached


def test_attack_does_not_move_batchnorm_running_statistics():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=1, image_size=8, width=1, mean=[0.5], std=[0.25]).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    perturb(model, x, y, AttackConfig(method="pgd", eps=0.1, steps=5))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    model(x)  # an ordinary training forward still updates them
    assert not torch.equal(before["bn1.running_mean"], model.state_dict()["bn1.running_mean"])


def test_frozen_bn_stats_restores_momentum():
    bn = torch.nn.BatchNorm2d(3, momentum=0.3)
    with frozen_bn_stats(bn):
        bn(torch.rand(4, 3, 2, 2))
    assert bn.momentum == 0.3 and torch.equal(bn.running_mean, torch.zeros(3))


def test_selection_reports_clean_and_robust_accuracy_in_eval_mode(trained_lenet, digits):
    trained_lenet.train()
    verdict = select(trained_lenet, loader(digits.test, 180, shuffle=False), AttackConfig(method="pgd", eps=0.1, steps=10, step=0.02), torch.device("cpu"))
    result = {"clean": verdict.clean.accuracy, "robust": verdict.robust.accuracy}
    assert trained_lenet.training  # mode restored
    trained_lenet.eval()
    assert result["clean"] > 0.9
    assert result["robust"] < result["clean"] - 0.2


def test_restarts_draw_starts_for_the_whole_batch_so_more_restarts_break_a_superset(trained_lenet, digits_batch):
    x, y = digits_batch
    still_correct = []
    for restarts in (1, 3):
        generator = torch.Generator().manual_seed(0)
        attack = AttackConfig(method="pgd", eps=0.05, steps=3, step=0.02, restarts=restarts)
        still_correct.append(attack_batch(trained_lenet, x, y, attack, generator=generator)[1])
    assert not (still_correct[1] & ~still_correct[0]).any()  # image by image, not only on average
    assert still_correct[1].sum() < still_correct[0].sum()


def test_an_attack_with_its_own_generator_leaves_the_global_random_state_alone(trained_lenet, digits_batch):
    x, y = digits_batch
    torch.manual_seed(4)
    expected = torch.rand(2)
    torch.manual_seed(4)
    attack_batch(trained_lenet, x[:32], y[:32], AttackConfig(method="pgd", eps=0.05, steps=2, restarts=2), generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(2), expected)


def test_pgd_starts_from_the_given_perturbation(trained_lenet, digits_batch):
    x, y = digits_batch[0][:16], digits_batch[1][:16]
    start = torch.full_like(x, 0.05)
    first = pgd(trained_lenet, x, y, eps=0.1, step=0.01, steps=0, start=start)
    assert torch.allclose(first, (x + start).clamp(0, 1))
