"""bench reuses compress's saved judgement when the weights, images and attacks are the same, judges
afresh when any of them changed, and judges only what a saved judgement lacks when asked for more."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from rapc import judge as judge_module
from rapc import judgement
from rapc.bench import run as bench_module
from rapc.bench.latency import TimingPolicy
from rapc.bench.run import BenchOptions, bench_run
from rapc.cli import main
from rapc.data import load_data
from rapc.export.artifacts import check_set
from rapc.modelio import WEIGHTS
from rapc.rundir import RunPaths

QUICK = TimingPolicy(warmup=1, min_iters=3, min_seconds=0.01)
FAST = {"backends": ("torch-eager",), "batch_sizes": (1,), "timing": QUICK}


class Lines:
    """A reporter that keeps what bench logs."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def begin(self, title, total): pass

    def advance(self, live=None): pass

    def end(self, summary): pass

    def log(self, text): self.lines.append(text)


@pytest.fixture
def run(digits_run, tmp_path):
    return shutil.copytree(digits_run, tmp_path / "run", ignore=shutil.ignore_patterns("bench", "export"))


@pytest.fixture
def judged(monkeypatch):
    """The titles of the models bench judges (afresh), in order."""
    titles: list[str] = []
    real = bench_module.judge

    def counting(model, x, y, protocol, n_classes=None, reporter=None, title="", keep_images=True):
        titles.append(title)
        return real(model, x, y, protocol, n_classes, reporter, title, keep_images)

    monkeypatch.setattr(bench_module, "judge", counting)
    return titles


def _attacks_run(monkeypatch):
    """Every attack of the judge now fails the test: nothing may be attacked."""
    monkeypatch.setattr(judge_module, "_judge_batch", lambda *a, **k: pytest.fail("attacked new images"))
    monkeypatch.setattr(judge_module, "_cascade", lambda *a, **k: pytest.fail("ran the ensemble"))


def test_compress_saves_each_models_judgement_per_image_with_its_adversarial_images(run):
    paths = RunPaths(run)
    summary = paths.summary()
    for name in ("dense", "compressed"):
        tensors = load_file(str(paths.judgement(name)))
        assert set(tensors) == {"clean.correct", "fgsm.correct", "fgsm.images", "pgd.correct", "pgd.images",
                                "ensemble.correct", "ensemble.images"}
        assert tensors["pgd.correct"].dtype == torch.bool and tensors["pgd.images"].shape == (360, 1, 8, 8)
        assert tensors["ensemble.correct"].float().mean().item() == summary[name]["judge"]["robust"]["accuracy"]
        assert summary[name]["judge"]["protocol"]["batch"] == 360  # the test loader's: PGD's random starts are drawn per batch


def test_bench_with_its_defaults_reuses_compress_judgement_and_reports_its_figures(run, judged, monkeypatch):
    _attacks_run(monkeypatch)
    lines = Lines()
    report = bench_run(run, BenchOptions(**FAST), reporter=lines)
    assert judged == []
    assert "reused compress's judgement of dense (n=360, ensemble n=360)" in lines.lines
    assert "reused compress's judgement of compressed (n=360, ensemble n=360)" in lines.lines
    summary = RunPaths(run).summary()
    for name in ("dense", "compressed"):
        assert report["robustness"][name] == summary[name]["judge"]
    assert report["replay"] == {}  # nothing exported in this copy; the replay's images are tested in test_run.py
    assert not (run / "bench" / "attacks").exists()  # nothing judged, nothing to keep


def test_a_run_without_a_saved_judgement_is_judged_afresh_to_the_same_figures(run, judged):
    """The saved judgement is what bench's own judge would say: same protocol, batches and images."""
    shutil.rmtree(RunPaths(run).judgement("dense").parent)
    report = bench_run(run, BenchOptions(**FAST))
    assert judged == ["dense", "compressed"]
    summary = RunPaths(run).summary()
    for name in ("dense", "compressed"):
        fresh, saved = report["robustness"][name], summary[name]["judge"]
        assert [(a["name"], a["n"], a["accuracy"]) for a in fresh["attacks"]] == [(a["name"], a["n"], a["accuracy"]) for a in saved["attacks"]]
        assert fresh["protocol"] == saved["protocol"]


@pytest.mark.parametrize("options", [{"pgd": (5, 2)}, {"n_eval": 100}, {"n_ensemble": 100}], ids=["pgd", "n_eval", "n_ensemble"])
def test_another_protocol_or_fewer_images_is_judged_afresh(run, judged, options):
    report = bench_run(run, BenchOptions(**FAST, **options))
    assert judged == ["dense", "compressed"]
    assert (run / "bench" / "attacks" / "dense.safetensors").is_file()
    if "n_eval" in options:
        assert all(a["n"] == 100 for a in report["robustness"]["dense"]["attacks"])


def test_another_weights_file_is_judged_afresh_and_the_other_model_reused(run, judged):
    weights = RunPaths(run).compressed / WEIGHTS
    tensors = load_file(str(weights))
    first = next(iter(tensors))
    tensors[first] = tensors[first] * 1.01
    save_file(tensors, str(weights))
    lines = Lines()
    bench_run(run, BenchOptions(**FAST), reporter=lines)
    assert judged == ["compressed"]
    assert any(line.startswith("reused compress's judgement of dense") for line in lines.lines)


def test_more_images_and_the_ensemble_on_more_are_judged_on_top_of_a_saved_judgement(run, judged, monkeypatch):
    """Only the images and attacks the saved verdict lacks are attacked; what it had is kept image by image."""
    shutil.rmtree(RunPaths(run).judgement("dense").parent)
    small = bench_run(run, BenchOptions(**FAST, n_eval=100, n_ensemble=50))
    assert judged == ["dense", "compressed"]
    cfg = RunPaths(run).config()
    images, labels = check_set(load_data(cfg.data, cfg.seed), 200)
    before = judgement.load(run / "bench" / "attacks" / "dense.safetensors", images)
    batches: list[int] = []
    real = judge_module._judge_batch
    monkeypatch.setattr(judge_module, "_judge_batch", lambda model, x, *a: batches.append(len(x)) or real(model, x, *a))
    lines = Lines()
    more = bench_run(run, BenchOptions(**FAST, n_eval=200, n_ensemble=120), reporter=lines)
    assert judged == ["dense", "compressed"] and batches == [100, 100]  # only the 100 new images, once per model
    assert "an earlier bench's judgement of dense (n=100, ensemble n=50) reused; judging only what it lacks" in lines.lines
    dense = {a["name"]: a for a in more["robustness"]["dense"]["attacks"]}
    assert {name: a["n"] for name, a in dense.items()} == {"clean": 200, "fgsm": 200, "pgd": 200, "ensemble": 120}
    after = judgement.load(run / "bench" / "attacks" / "dense.safetensors", images)
    assert after.describe() == "n=200, ensemble n=120"
    for name in ("clean", "fgsm", "pgd", "ensemble"):
        old, new = before.verdict[name], after.verdict[name]
        assert torch.equal(new.correct[: old.n], old.correct) and torch.equal(new.images[: old.n], old.images)
    # clean and FGSM draw nothing at random: on the new images they are what a fresh judge says
    fresh = bench_module.judge(bench_module.load_model(RunPaths(run).dense).eval(), images, labels,
                               judge_module.Protocol(**more["judge"]))
    for name in ("clean", "fgsm"):
        assert torch.equal(after.verdict[name].correct, fresh[name].correct)
    # the robust figure is still the worst case with PGD on every image the ensemble saw
    assert bool((after.verdict["ensemble"].correct <= after.verdict["pgd"].correct[:120]).all())
    assert small["robustness"]["dense"]["attacks"][0]["n"] == 100


def test_full_attacks_run_only_fab_t_and_square_on_top_of_a_saved_judgement(run, judged, monkeypatch):
    bench_run(run, BenchOptions(**FAST, n_eval=30, n_ensemble=20))
    judged.clear()
    monkeypatch.setattr(judge_module, "_judge_batch", lambda *a, **k: pytest.fail("attacked the images again"))
    report = bench_run(run, BenchOptions(**FAST, n_eval=30, n_ensemble=20, attacks="full"))
    assert judged == []
    dense = report["robustness"]["dense"]
    assert [(a["name"], a["n"]) for a in dense["attacks"]] == [("clean", 30), ("fgsm", 30), ("pgd", 30), ("ensemble", 20), ("autoattack", 20)]
    assert dense["attacks"][-1]["accuracy"] <= dense["attacks"][-2]["accuracy"]
    assert set(dense["attacks"][-1]["broken_by"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}


def test_the_full_judgement_judges_afresh_rather_than_on_top_of_a_smaller_one(run, judged):
    shutil.rmtree(RunPaths(run).judgement("dense").parent)
    bench_run(run, BenchOptions(**FAST, n_eval=50, n_ensemble=50))
    judged.clear()
    lines = Lines()
    report = bench_run(run, BenchOptions(**FAST, full_judgement=True), reporter=lines)
    assert judged == ["dense", "compressed"] and not any("reused" in line for line in lines.lines)
    assert all(a["n"] == 360 for a in report["robustness"]["dense"]["attacks"])


def test_the_full_judgement_reuses_compress_judgement_when_it_is_all_of_it(run, judged):
    result = CliRunner().invoke(main, ["bench", str(run), "--full-judgement", "--backends", "torch-eager", "--batch-sizes", "1",
                                       "--min-seconds", "0.01"])
    assert result.exit_code == 0, result.output
    assert judged == [] and "reused compress's judgement of dense (n=360, ensemble n=360)" in result.output
    assert json.loads((run / "bench" / "bench.json").read_text())["n_eval"] == 360


def test_the_full_judgement_with_a_count_of_images_is_a_one_line_error(run):
    result = CliRunner().invoke(main, ["bench", str(run), "--full-judgement", "--n-eval", "10"])
    assert result.exit_code == 2 and "error: the full judgement is every test image" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_damaged_saved_judgement_is_judged_afresh(run, judged):
    RunPaths(run).judgement("dense").write_bytes(b"not safetensors")
    bench_run(run, BenchOptions(**FAST))
    assert judged == ["dense"]
