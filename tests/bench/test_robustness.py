import pytest

from rapc.bench.robustness import bench_protocol, replay
from rapc.config import AttackConfig
from rapc.errors import RapcError
from rapc.export.runners import TorchRunner
from rapc.judge import judge
from rapc.modelio import load_model

EVAL = AttackConfig(eps=0.1, steps=10)  # the digits preset's attack.eval


@pytest.fixture(scope="module")
def robust_lenet(digits_run):
    """The adversarially trained (eps 0.1) dense LeNet of the shared digits run."""
    return load_model(digits_run / "dense").eval()


def test_the_quick_level_is_the_judges_final_protocol_with_the_ensemble():
    quick = bench_protocol(EVAL, "quick", seed=3)
    assert (quick.level, quick.steps, quick.restarts, quick.pgd_step, quick.seed) == ("final", 10, 2, pytest.approx(0.025), 3)
    full = bench_protocol(EVAL, "full", pgd=(50, 5), n_ensemble=100)
    assert (full.level, full.steps, full.restarts, full.n_ensemble) == ("full", 50, 5, 100)
    assert full.pgd_label == "PGD-50x5 step 0.005"  # --pgd uses the rule 2.5*eps/steps
    assert bench_protocol(AttackConfig(eps=0.3, steps=20, step=0.02), pgd=(40, 2)).pgd_step == pytest.approx(0.01875)


def test_quick_attacks_lower_accuracy_in_order_and_replay_exactly(robust_lenet, digits_batch):
    x, y = digits_batch[0][:150], digits_batch[1][:150]
    verdict = judge(robust_lenet, x, y, bench_protocol(EVAL, "quick"))
    assert verdict.names == ["clean", "fgsm", "pgd", "ensemble"]
    clean, fgsm, pgd, ensemble = (verdict[n].accuracy for n in verdict.names)
    assert clean > fgsm >= pgd >= ensemble
    assert verdict.worst_case() <= ensemble
    replayed = replay(TorchRunner(robust_lenet), verdict, y)  # the saved images fool the model again, exactly
    assert replayed == pytest.approx({r.name: r.accuracy for r in verdict.results} | {"all": verdict.worst_case()})


def test_full_adds_fab_t_and_square_on_what_the_ensemble_left(robust_lenet, digits_batch):
    x, y = digits_batch[0][:80], digits_batch[1][:80]
    verdict = judge(robust_lenet, x, y, bench_protocol(EVAL, "full", n_ensemble=50))
    assert verdict.names == ["clean", "fgsm", "pgd", "ensemble", "autoattack"]
    aa = verdict["autoattack"]
    assert aa.n == 50 and aa.accuracy <= verdict["ensemble"].accuracy
    assert set(aa.details) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert "FAB-T" in aa.label and "Square (5000 queries)" in aa.label
    assert (aa.images - x[:50]).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("kwargs, message", [
    ({"level": "thorough"}, "attacks must be one of quick, full"),
    ({"attack": AttackConfig(method="none")}, "bench robustness needs a positive eps"),
])
def test_bad_plans_are_user_errors(kwargs, message):
    with pytest.raises(RapcError, match=message):
        bench_protocol(**({"attack": EVAL} | kwargs))
