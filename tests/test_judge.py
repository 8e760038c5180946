"""The judge: one protocol, labelled figures, and gradient-masking checks that fire on masked models
and stay silent on an honest one. The trained model is the adversarially trained (eps 0.1) dense
LeNet of the shared digits run."""

import json
import math
import warnings

import pytest
import torch
from torch import nn

from rapc.attacks import robust_correct
from rapc.config import AttackConfig, ConfigWarning, load_config
from rapc.data import loader
from rapc.errors import RapcError
from rapc.judge import (
    AttackResult, Protocol, Verdict, autoattack, final_protocol, judge, judge_loader, masking_warnings, select,
    selection_protocol,
)
from rapc.modelio import load_model
from rapc.results import JudgeResult, ModelResult

EPS = 0.1


@pytest.fixture(scope="module")
def robust_lenet(digits_run):
    return load_model(digits_run / "dense").eval()


@pytest.fixture(scope="module")
def final_verdict(robust_lenet, digits_batch):
    x, y = digits_batch
    return judge(robust_lenet, x, y, Protocol(eps=EPS, steps=10, level="final"))


class Quantized(nn.Module):
    """Rounds its input to 4 gray levels first: an input gradient of exactly zero, the textbook gradient mask."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 3) / 3)


class Saturated(nn.Module):
    """Logits scaled by 1e4: the same decisions, but the softmax saturates, so the cross-entropy
    gradient underflows to zero on every confident image; APGD-T's DLR loss is scale-free."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * 1e4


class _LieOffTheGrid(torch.autograd.Function):
    """Identity; the input gradient is honest on clean digits (pixels on the 1/16 grid) and reversed elsewhere."""

    @staticmethod
    def forward(ctx, x):
        ctx.on_grid = (x * 16 - (x * 16).round()).abs().flatten(1).amax(1) < 1e-4
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        sign = ctx.on_grid.to(grad.dtype) * 2 - 1
        return grad * sign.view(-1, *[1] * (grad.dim() - 1))


class Lying(nn.Module):
    """FGSM, which steps from the clean image, sees the true gradient; PGD, which starts from a
    random point, is led the wrong way: a stronger attack that reports higher accuracy."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_LieOffTheGrid.apply(x))


def test_the_judge_lowers_accuracy_at_least_as_much_as_pgd20(robust_lenet, digits_batch, final_verdict):
    x, y = digits_batch
    torch.manual_seed(0)
    pgd20 = float(robust_correct(robust_lenet, x, y, AttackConfig(eps=EPS, steps=20, step=0.025)).float().mean())
    assert final_verdict.robust.name == "ensemble"
    assert final_verdict.robust.accuracy <= pgd20
    assert final_verdict.robust.accuracy <= final_verdict["pgd"].accuracy < final_verdict.clean.accuracy
    assert final_verdict.clean.accuracy > 0.8 and final_verdict.robust.accuracy > 0.2  # a robust model, not a broken one
    # worst case per image: the ensemble counts an image robust only if PGD and both APGD parts failed on it
    assert not (final_verdict["ensemble"].correct & ~final_verdict["pgd"].correct).any()
    assert set(final_verdict.robust.details) == {"apgd-ce", "apgd-t"}


def test_the_verdicts_are_the_models_verdicts_on_the_kept_images(robust_lenet, digits_batch, final_verdict):
    x, y = digits_batch
    clean = final_verdict.clean.correct
    for r in final_verdict.results:
        assert (r.images - x).abs().max() <= EPS + 1e-6 and r.images.min() >= 0 and r.images.max() <= 1
        with torch.no_grad():
            assert torch.equal(r.correct, (robust_lenet(r.images).argmax(1) == y) & clean), r.name
    replayed = final_verdict.replay(lambda a: robust_lenet(torch.from_numpy(a)).detach().numpy(), y)
    assert replayed == pytest.approx({r.name: r.accuracy for r in final_verdict.results} | {"all": final_verdict.worst_case()})


@pytest.mark.parametrize("weaker, stronger", [
    ((10, 2, 0.0125), (20, 2, 0.0125)),  # more steps at the same step size
    ((20, 2, 0.0125), (20, 4, 0.0125)),  # more restarts
    ((10, 2, None), (50, 4, None)),  # both, at the rule's step 2.5*eps/steps
])
def test_more_steps_and_restarts_never_raise_accuracy(robust_lenet, digits_batch, weaker, stronger):
    x, y = digits_batch
    verdicts = [judge(robust_lenet, x, y, Protocol(eps=EPS, steps=s, restarts=r, step=step, level="final", n_ensemble=120))
                for s, r, step in (weaker, stronger)]
    assert verdicts[1].robust.accuracy <= verdicts[0].robust.accuracy
    assert verdicts[1]["pgd"].accuracy <= verdicts[0]["pgd"].accuracy
    if weaker[2] is not None:  # same step size: nested image by image
        assert not (verdicts[1]["pgd"].correct & ~verdicts[0]["pgd"].correct).any()
        assert not (verdicts[1].robust.correct & ~verdicts[0].robust.correct).any()


def test_every_figure_carries_its_label_n_and_standard_error(final_verdict, digits_batch):
    out = json.loads(json.dumps(final_verdict.to_dict()))
    labels = {a["name"]: a["label"] for a in out["attacks"]}
    assert labels == {"clean": "clean", "fgsm": "FGSM step 0.1", "pgd": "PGD-10x2 step 0.025",
                      "ensemble": "ensemble PGD-10x2 step 0.025 + APGD-CE + APGD-T (100 steps, 9 targets)"}
    for a in out["attacks"]:
        assert a["n"] == len(digits_batch[1])
        assert a["stderr"] == pytest.approx(math.sqrt(a["accuracy"] * (1 - a["accuracy"]) / a["n"]))
    assert out["robust"]["label"] == labels["ensemble"] and out["robust"]["n"] == 360
    assert out["protocol"]["steps"] == 10 and out["protocol"]["restarts"] == 2
    assert "PGD-10x2 step 0.025, n=360" in final_verdict.summary() and " ± " in final_verdict.summary()


def test_a_verdicts_figures_come_back_from_json_as_they_were_judged(final_verdict):
    result = JudgeResult.from_json(json.loads(json.dumps(final_verdict.to_dict())))
    assert result == final_verdict.result()
    assert result.robust.describe() == final_verdict.robust.describe() and result["pgd"].accuracy == final_verdict["pgd"].accuracy
    assert result.clean.n == 360 and result.worst_case == final_verdict.worst_case()


def test_a_summary_from_before_the_per_attack_figures_is_refused_with_what_to_run():
    old = {"params": 10, "macs": 20, "sparsity": 0.0, "file_bytes": 30, "clean": 0.9, "robust": 0.5}
    with pytest.raises(RapcError, match=r"runs/x/summary.json was written before the judge's per-attack figures; `rapc report RUN`"):
        ModelResult.from_json(old, "runs/x/summary.json")


def test_the_ensemble_can_be_capped_to_the_first_n_images(robust_lenet, digits_batch):
    x, y = digits_batch
    verdict = judge(robust_lenet, x[:100], y[:100], Protocol(eps=EPS, steps=5, n_ensemble=30, batch=64))
    assert [r.n for r in verdict.results] == [100, 100, 100, 30]
    assert verdict.to_dict()["robust"]["n"] == 30


def test_protocols_follow_the_config_with_the_step_rule_and_at_least_two_restarts():
    selection = selection_protocol(AttackConfig(eps=0.3, steps=20))
    assert (selection.level, selection.steps, selection.restarts) == ("selection", 20, 2)
    assert selection.pgd_step == pytest.approx(0.0375) and selection.pgd_label == "PGD-20x2 step 0.0375"
    assert final_protocol(AttackConfig(eps=0.3, steps=20, restarts=5)).restarts == 5
    assert final_protocol(AttackConfig(eps=0.3, steps=20, random_start=False)).restarts == 1  # every restart would repeat
    assert final_protocol(AttackConfig(eps=0.3, steps=20, step=0.05)).pgd_label == "PGD-20x2 step 0.05"  # a set step is kept, and named
    assert final_protocol(AttackConfig(method="none")).eps == 0


def test_selection_is_clean_and_pgd_on_a_loader_and_leaves_the_callers_random_state(robust_lenet, digits):
    val = loader(digits.test, 128, shuffle=False)
    robust_lenet.train()
    tensors = {name: (t, t.data_ptr()) for name, t in [*robust_lenet.named_parameters(), *robust_lenet.named_buffers()]}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    verdict = select(robust_lenet, val, AttackConfig(eps=EPS, steps=5))
    assert torch.equal(torch.rand(3), expected)  # a training run's shuffling is not reseeded by the judge
    assert robust_lenet.training
    for name, t in [*robust_lenet.named_parameters(), *robust_lenet.named_buffers()]:  # attacked in channels_last, given back
        was, pointer = tensors[name]  # as they were: the optimizer's and the checkpoint's own tensors
        assert t is was and t.data_ptr() == pointer and t.is_contiguous(), name
    robust_lenet.eval()
    assert verdict.names == ["clean", "pgd"] and verdict.robust.label == "PGD-5x2 step 0.05"
    assert verdict.robust.n == len(digits.test) and verdict.robust.images is None
    assert verdict.robust.accuracy < verdict.clean.accuracy
    assert verdict.zero_gradients is None and verdict.warnings == []
    again = judge_loader(robust_lenet, val, selection_protocol(AttackConfig(eps=EPS, steps=5)))
    assert torch.equal(again.robust.correct, verdict.robust.correct)  # fixed seed: the same verdicts every epoch


def test_an_honest_model_raises_no_masking_warning(robust_lenet, digits_batch, final_verdict):
    assert final_verdict.warnings == [] and final_verdict.zero_gradients == 0
    x, y = digits_batch
    full = judge(robust_lenet, x[:60], y[:60], Protocol(eps=EPS, steps=10, level="full"))
    assert full.robust.name == "autoattack" and set(full.robust.details) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert full.robust.accuracy <= full["ensemble"].accuracy
    assert full.warnings == []


def test_a_large_gap_between_pgd_and_the_ensemble_is_flagged(robust_lenet, digits_batch):
    x, y = digits_batch
    verdict = judge(Saturated(robust_lenet).eval(), x[:120], y[:120], Protocol(eps=EPS, steps=10))
    assert verdict["pgd"].accuracy - verdict["ensemble"].accuracy > 0.10
    assert any("a gap of" in w and "PGD-10x2 step 0.025 says" in w for w in verdict.warnings)
    assert verdict.zero_gradients > 0 and any("all-zero input gradient" in w for w in verdict.warnings)


def test_accuracy_that_rises_with_a_stronger_attack_is_flagged(robust_lenet, digits_batch):
    x, y = digits_batch
    verdict = judge(Lying(robust_lenet).eval(), x[:120], y[:120], Protocol(eps=EPS, steps=10))
    assert verdict["pgd"].accuracy > verdict["fgsm"].accuracy
    assert any(w.startswith("PGD-10x2 step 0.025 accuracy") and "above FGSM step 0.1's" in w for w in verdict.warnings)


def test_square_breaking_what_white_box_attacks_could_not_is_flagged(robust_lenet, digits_batch):
    x, y = digits_batch
    verdict = judge(Quantized(robust_lenet).eval(), x[:60], y[:60], Protocol(eps=EPS, steps=10, level="full"))
    assert verdict.robust.details["square"] > 0
    assert any("Square attack broke" in w for w in verdict.warnings)
    assert any("all-zero input gradient" in w for w in verdict.warnings)


def test_rises_are_compared_on_the_same_images():
    def result(name, correct):
        return AttackResult(name, name.upper(), torch.tensor(correct))

    results = [result("clean", [True] * 4), result("fgsm", [True, False, False, False]),
               result("pgd", [True, True, False, False]), result("ensemble", [True, True])]
    warnings_ = masking_warnings(results, zero_gradients=0)
    assert warnings_[0].startswith("PGD accuracy 50.0% is above FGSM's 25.0% on the same 4 images")
    # the ensemble saw the first 2 images only: there FGSM is at 50%, below the ensemble's 100%
    assert warnings_[1].startswith("ENSEMBLE accuracy 100.0% is above FGSM's 50.0% on the same 2 images")
    assert masking_warnings(results[:2], zero_gradients=0) == []


def test_standard_autoattack_alone_is_deterministic_for_a_fixed_seed(robust_lenet, digits_batch):
    x, y = digits_batch[0][:24], digits_batch[1][:24]
    first = autoattack(robust_lenet, x, y, eps=EPS, seed=3)
    again = autoattack(robust_lenet, x, y, eps=EPS, seed=3)
    assert torch.equal(first.correct, again.correct) and first.details == again.details
    assert set(first.details) == {"apgd-ce", "apgd-t", "fab-t", "square"} and "Square (5000 queries)" in first.label


def test_a_verdict_survives_a_weights_only_round_trip(final_verdict, tmp_path):
    torch.save(final_verdict.state_dict(), tmp_path / "v.pt")
    loaded = Verdict.from_state_dict(torch.load(tmp_path / "v.pt", weights_only=True))
    assert loaded.to_dict() == final_verdict.to_dict()


@pytest.mark.parametrize("options, message", [
    ({"level": "thorough"}, "judge level must be one of selection, final, full"),
    ({"eps": 1.5}, "attack eps must be in"),
    ({"steps": 0}, "at least 1 step"),
    ({"n_ensemble": 0}, "at least 1 image"),
])
def test_bad_protocols_are_user_errors(options, message):
    with pytest.raises(RapcError, match=message):
        Protocol(**({"eps": EPS} | options))


def test_an_eval_attack_too_short_to_cross_the_eps_box_is_a_config_warning():
    with pytest.warns(ConfigWarning, match=r"10 steps of 0.01 travel 0.1 < 2\*eps = 0.2"):
        load_config("digits-lenet-filter", ["attack.eval.step=0.01"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        for preset in ("digits-lenet-filter", "mnist-lenet-filter", "mnist-lenet-column", "cifar10-resnet18-filter", "cifar10-vgg16-column"):
            cfg = load_config(preset)  # the presets leave the eval step to the rule
            assert cfg.attack.eval.step is None, preset
        load_config("digits-lenet-filter", ["attack.train.step=0.01"])  # a short training walk is a choice, not a mistake
