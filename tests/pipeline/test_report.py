"""rapc report: a trained run judged apart from its training, again with other settings, never retrained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from rapc import judge
from rapc.cli import main
from rapc.config import load_config
from rapc.errors import RapcError
from rapc.pipeline.report import report
from rapc.rundir import RunDir, RunPaths

N = 24  # the ensemble on the first 24 test images: enough to tell another n from the run's (all 360)


@pytest.fixture
def run(digits_run: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the finished digits run that nothing may train again."""
    def fail(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr("rapc.pipeline.trainer.train_epoch", fail)
    return shutil.copytree(digits_run, tmp_path / "run")


def _ensemble(figures: dict) -> dict:
    return next(a for a in figures["judge"]["attacks"] if a["name"] == "ensemble")


def test_report_judges_again_with_another_ensemble_n_once_per_model_and_rewrites_the_summary(run: Path, monkeypatch) -> None:
    before = RunPaths(run).summary()
    calls = []
    real = judge.judge_loader

    def counting(model, data, protocol, *args, **kwargs):
        calls.append(protocol.n_ensemble)
        return real(model, data, protocol, *args, **kwargs)

    monkeypatch.setattr("rapc.judge.judge_loader", counting)
    printed = CliRunner().invoke(main, ["report", str(run), "--n-ensemble", str(N)])
    assert printed.exit_code == 0, printed.output
    assert calls == [N, N]  # dense and compressed, once each
    assert f"n={N}" in printed.output and "dense vs compressed" in printed.output
    after = RunPaths(run).summary()
    for name in ("dense", "compressed"):
        assert _ensemble(before[name])["n"] == 360 and _ensemble(after[name])["n"] == N
        # clean and PGD see the same images with the same seeded starts: the same figures
        assert (after[name]["clean"], after[name]["pgd"]) == (before[name]["clean"], before[name]["pgd"])
    assert (after["layers"], after["notes"], after["baseline"], after["shrink"]) == (
        before["layers"], before["notes"], before["baseline"], before["shrink"])
    assert after["seconds"]["pretrain"] == before["seconds"]["pretrain"]
    assert report(run, n_ensemble=N).to_json() | {"seconds": None} == after | {"seconds": None}  # now reused
    assert calls == [N, N]


def test_report_reuses_verdicts_that_are_what_it_asks_with_the_seconds_they_took(run: Path, monkeypatch) -> None:
    before = RunPaths(run).summary()

    def fail(*args, **kwargs):
        raise AssertionError("judged again")

    monkeypatch.setattr("rapc.judge.judge_loader", fail)
    result = report(run)
    assert (result.dense.to_json(), result.compressed.to_json(), result.warnings) == (before["dense"], before["compressed"], before["warnings"])
    saved = sum(a["seconds"] for name in ("dense", "compressed") for a in before[name]["judge"]["attacks"])
    assert result.seconds["final judge"] == pytest.approx(saved)


def test_a_run_finished_before_trained_json_existed_is_reported_from_its_summary(run: Path) -> None:
    before = RunPaths(run).summary()
    (run / "trained.json").unlink()
    assert report(run).trained.layers == before["layers"]


def test_report_of_an_untrained_run_says_how_to_finish_it(tmp_path: Path) -> None:
    RunDir(tmp_path / "r").start(load_config("digits-lenet-filter"))
    with pytest.raises(RapcError, match="compress --resume"):
        report(tmp_path / "r")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "r")])
    assert result.exit_code == 2 and "has not finished training" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a run directory" in result.output
