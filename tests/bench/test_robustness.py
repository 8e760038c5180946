import pytest
import torch
from torch import nn

from rapc.bench.robustness import (
    AttackPlan, AttackResult, autoattack, evaluate_robustness, replay, sanity_warnings, zero_gradient_count,
)
from rapc.export.runners import TorchRunner
from rapc.errors import RapcError
from rapc.modelio import load_model


@pytest.fixture(scope="module")
def robust_lenet(digits_run):
    """The adversarially trained (eps 0.1) dense LeNet of the shared digits run."""
    return load_model(digits_run / "dense").eval()


class Quantized(nn.Module):
    """Rounds its input to 4 gray levels first: an input gradient of exactly zero, the textbook gradient mask."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 3) / 3)


def test_quick_plan_attacks_lower_accuracy_in_order_and_keep_images_in_the_eps_ball(robust_lenet, digits_batch):
    x, y = digits_batch
    plan = AttackPlan(eps=0.1, level="quick")
    result = evaluate_robustness(robust_lenet, x, y, plan, n_classes=10)
    by_name = result.by_name()
    assert list(by_name) == ["clean", "fgsm", "pgd-20x1"]
    assert by_name["clean"].accuracy > 0.8
    assert by_name["clean"].accuracy > by_name["fgsm"].accuracy >= by_name["pgd-20x1"].accuracy
    for r in result.results:
        assert (r.images - x).abs().max() <= 0.1 + 1e-6 and r.images.min() >= 0 and r.images.max() <= 1
        with torch.no_grad():  # the recorded verdicts are the model's verdicts on the recorded images
            assert torch.equal(r.correct, (robust_lenet(r.images).argmax(1) == y) & by_name["clean"].correct)
    assert result.worst_case() == pytest.approx(by_name["pgd-20x1"].accuracy, abs=0.01)
    assert result.zero_gradients == 0 and result.warnings == []


def test_autoattack_at_reference_settings_reports_no_more_than_pgd(robust_lenet, digits_batch):
    x, y = digits_batch[0][:120], digits_batch[1][:120]
    plan = AttackPlan(eps=0.1, level="full", pgd=(20, 2))
    result = evaluate_robustness(robust_lenet, x, y, plan, n_classes=10)
    by_name = result.by_name()
    assert list(by_name) == ["clean", "fgsm", "pgd-20x1", "pgd-20x2", "autoattack"]
    aa = by_name["autoattack"]
    assert aa.accuracy <= by_name["pgd-20x1"].accuracy and aa.accuracy <= by_name["pgd-20x2"].accuracy
    assert aa.accuracy < by_name["clean"].accuracy  # it really attacks
    assert set(aa.details) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert sum(aa.details.values()) == int(by_name["clean"].correct.sum() - aa.correct.sum())
    assert (aa.images - x).abs().max() <= 0.1 + 1e-6
    replayed = replay(TorchRunner(robust_lenet), result, y)  # the saved images fool the model again, exactly
    assert replayed["autoattack"] == pytest.approx(aa.accuracy) and replayed["all"] == pytest.approx(result.worst_case())


def test_autoattack_is_deterministic_for_a_fixed_seed(robust_lenet, digits_batch):
    x, y = digits_batch[0][:40], digits_batch[1][:40]
    first = autoattack(robust_lenet, x, y, eps=0.1, n_classes=10, seed=3)
    again = autoattack(robust_lenet, x, y, eps=0.1, n_classes=10, seed=3)
    assert torch.equal(first.correct, again.correct) and first.details == again.details


def test_a_gradient_masked_model_is_flagged(robust_lenet, digits_batch):
    x, y = digits_batch[0][:60], digits_batch[1][:60]
    masked = Quantized(robust_lenet).eval()
    assert zero_gradient_count(masked, x, y, batch=64) > 0
    result = evaluate_robustness(masked, x, y, AttackPlan(eps=0.1, level="full", n_autoattack=30), n_classes=10)
    assert any("all-zero input gradient" in w for w in result.warnings)
    square = result.by_name()["autoattack"].details["square"]
    assert square > 0 and any("Square attack broke" in w for w in result.warnings)


def _result(name: str, correct: list[bool]) -> AttackResult:
    return AttackResult(name, name, torch.zeros(len(correct), 1), torch.tensor(correct), 0.0)


def test_accuracy_that_rises_with_a_stronger_attack_is_a_warning():
    results = [_result("clean", [True] * 4), _result("fgsm", [True, False, False, False]),
               _result("pgd-20x1", [True, True, False, False]), _result("pgd-50x5", [True, False, False, False])]
    (warning,) = sanity_warnings(results, zero_gradients=0)
    assert warning.startswith("pgd-20x1 accuracy 50.00% is above fgsm's 25.00%")
    assert sanity_warnings(results[:2] + results[3:], zero_gradients=0) == []


def test_bad_plans_are_user_errors():
    with pytest.raises(RapcError, match="attacks must be one of quick, full"):
        AttackPlan(eps=0.1, level="thorough")
    with pytest.raises(RapcError, match="eps must be positive"):
        AttackPlan(eps=0.0)
