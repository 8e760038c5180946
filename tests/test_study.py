"""rapc study on digits: the shared dense models and every row of one cell, cached per row and seed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from statistics import fmean, stdev

import pytest
import torch
from click.testing import CliRunner

from rapc.bench.latency import TimingPolicy
from rapc.cli import main
from rapc.config import Config, load_config
from rapc import judge
from rapc.errors import RapcError
from rapc.modelio import load_model, read_architecture
from rapc.pipeline.trainer import Trainer
from rapc.rundir import RunPaths
from rapc.study import DEFAULT_ROWS, StudyOptions, study
from rapc.study.evaluation import judged
from rapc.pipeline.parts import RunParts
from rapc.study.rows import final_model, initial_shrunk

# The judge's clean and PGD figures on the first 120 test images, the ensemble on 20: the attacks themselves are tested in
# tests/test_judge.py.
TINY = ("stages.pretrain.epochs=2", "stages.pretrain.clean_epochs=1", "stages.admm.epochs=1", "stages.retrain.epochs=1", "eval.n_test=120")
QUICK = TimingPolicy(warmup=2, min_iters=5, min_seconds=0.05)
N_ENSEMBLE = 20
OPTIONS = StudyOptions(ratios=(2.0,), schemes=("filter",), n_ensemble=N_ENSEMBLE, backends=("ort-cpu", "ort-cuda"), batch_sizes=(1, 8),
                       timing=QUICK)


@pytest.fixture(scope="module")
def tiny_cfg() -> Config:
    return load_config("digits-lenet-filter", TINY)


@pytest.fixture(scope="module")
def study_dir(tiny_cfg: Config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "digits"
    study(tiny_cfg, out, OPTIONS)
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "study.json").read_text())


def _rows(out: Path) -> dict[str, dict]:
    report = _report(out)
    return {row["row"]: row for row in report["dense"] + report["rows"]}


def _row_dir(out: Path, key: str, seed: int = 0) -> Path:
    return out / f"seed{seed}" / key


def test_study_trains_every_row_to_rapcs_architecture(study_dir: Path) -> None:
    rows = _rows(study_dir)
    assert set(rows) == {"dense-robust", "dense-natural", "dense-matched", *DEFAULT_ROWS}
    rapc, dense = rows["rapc"], rows["dense-robust"]
    # filter pruning at 2x halves filters and the next layer's inputs: at least 2x fewer parameters
    assert 2 <= dense["params"] / rapc["params"] <= 4.5 and rapc["macs"] < dense["macs"]
    for name in DEFAULT_ROWS:  # magnitude pruning at the same scheme and ratio keeps as many filters per layer
        if name != "rapc-sensitivity":
            assert (rows[name]["params"], rows[name]["macs"]) == (rapc["params"], rapc["macs"]), name
    # sensitivity allocation spends the rapc row's MACs over the layers otherwise: the same budget, other widths
    assert 0.98 <= rows["rapc-sensitivity"]["macs"] / rapc["macs"] <= 1.0
    assert (rows["dense-matched"]["params"], rows["dense-matched"]["macs"]) == (dense["params"], dense["macs"])
    for row in rows.values():
        judge = row["seeds"][0]["judge"]
        assert 0 <= judge["robust"]["accuracy"] <= judge["clean"] <= 1
        assert row["train_seconds"] > 0
    robust = {name: {a["name"]: a["mean"] for a in row["figures"]} for name, row in rows.items()}
    assert robust["dense-natural"]["pgd"] < robust["dense-robust"]["pgd"]  # adversarial training buys robustness


def _at_eps(schedule: list[dict]) -> list[tuple]:
    return [(p["stage"], p["optimizer"], p["lr"], p["schedule"], p["ramp_epochs"], p["full_eps_epochs"])
            for p in schedule if p["ramp_epochs"] + p["full_eps_epochs"]]


def test_the_rows_of_a_cell_and_dense_matched_end_on_equal_schedules_as_their_configs_record(study_dir: Path, tiny_cfg: Config) -> None:
    rows = _rows(study_dir)
    compared = {name: rows[name] for name in (*DEFAULT_ROWS, "dense-matched")}
    stages = tiny_cfg.stages
    full_eps = stages.pretrain.epochs - stages.pretrain.clean_epochs + stages.admm.epochs + stages.retrain.epochs
    retrain = ("retrain", stages.retrain.epochs, stages.retrain.optimizer.name, stages.retrain.optimizer.lr, stages.retrain.schedule.name)
    for name, row in compared.items():
        assert row["full_eps_epochs"] == sum(p["full_eps_epochs"] for p in row["schedule"]) == full_eps == 3, name
        assert _at_eps(row["schedule"]) == _at_eps(rows["rapc"]["schedule"]), name  # the same recipes at eps, in order
        last = row["schedule"][-1]
        assert (last["stage"], last["epochs"], last["optimizer"], last["lr"], last["schedule"]) == retrain, name
    # the shared pretraining counts once; only finetune-standard's natural start comes on top
    assert {name: sum(row["epochs"].values()) for name, row in compared.items()} == {
        **{name: 4 for name in compared}, "finetune-standard": 4 + stages.pretrain.epochs}
    assert rows["dense-robust"]["full_eps_epochs"] == 1 and rows["dense-natural"]["full_eps_epochs"] == 0


def test_every_row_trained_the_epochs_at_full_eps_its_schedule_records(study_dir: Path, tiny_cfg: Config) -> None:
    eps = tiny_cfg.attack.train.eps
    for row in _rows(study_dir).values():
        logged = [json.loads(line) for line in (study_dir / row["seeds"][0]["dir"] / "metrics.jsonl").read_text().splitlines()]
        trained = [r for r in logged if "train_eps" in r]
        own = [p for p in row["schedule"] if not p["shared"]]
        assert len(trained) == sum(p["epochs"] for p in own), row["key"]
        assert sum(r["train_eps"] == eps for r in trained) == sum(p["full_eps_epochs"] for p in own), row["key"]


def test_inherited_init_is_the_dense_init_of_the_kept_filters_and_scratch_is_fresh(study_dir: Path, tiny_cfg: Config) -> None:
    cpu = torch.device("cpu")
    dense = RunParts.start(tiny_cfg, cpu).fresh_model()
    shrunk = read_architecture(final_model(_row_dir(study_dir, "r2-filter/rapc")))
    _, inherited = initial_shrunk(tiny_cfg, shrunk, fresh=False, device=cpu)
    _, scratch = initial_shrunk(tiny_cfg, shrunk, fresh=True, device=cpu)
    first = next(name for name, _ in dense.named_parameters() if name.endswith("weight"))  # its input channels are the image's
    dense_filters = dict(dense.named_parameters())[first].detach().flatten(1)
    kept = dict(inherited.named_parameters())[first].detach().flatten(1)
    assert len(kept) < len(dense_filters)
    assert all((dense_filters == f).all(1).any() for f in kept)
    assert not any((dense_filters == f).all(1).any() for f in dict(scratch.named_parameters())[first].detach().flatten(1))


def test_rows_on_rapcs_architecture_keep_the_zeros_a_column_shrink_could_not_remove(study_dir: Path, tiny_cfg: Config, tmp_path: Path) -> None:
    out = shutil.copytree(study_dir, tmp_path / "copy")  # the dense models are reused, only the column rows train
    options = StudyOptions(ratios=(2.0,), schemes=("column",), rows=("rapc", "scratch", "inherited"), n_ensemble=N_ENSEMBLE,
                           backends=("ort-cpu",), batch_sizes=(1,), timing=QUICK)
    rows = _rows(study(tiny_cfg, out, options).out)
    assert rows["rapc"]["sparsity"] > 0.2
    assert rows["scratch"]["sparsity"] == rows["inherited"]["sparsity"] == rows["rapc"]["sparsity"]


def test_study_times_every_model_on_ort_cpu_and_lists_unavailable_gpu_backends(study_dir: Path) -> None:
    report = _report(study_dir)
    keys = {row["key"] for row in report["dense"] + report["rows"]}
    timed = {(l["artifact"], l["batch"]) for l in report["latency"] if l["backend"] == "ort-cpu"}
    assert timed == {(key, batch) for key in keys for batch in (1, 8)}
    assert all(l["p50_ms"] > 0 for l in report["latency"])
    if not torch.cuda.is_available():
        assert any(key.startswith("ort-cuda:") for key in report["skipped"])


def test_study_writes_markdown_with_the_budget_and_a_plot(study_dir: Path) -> None:
    import matplotlib.pyplot as plt

    text = (study_dir / "study.md").read_text()
    assert "Equal schedules" in text and "3 of them at full eps" in text and "Unequal" not in text
    assert "accuracy ± standard error" in text and "seeds" not in text
    for name in DEFAULT_ROWS:
        assert f"| 1/2 | filter | {name} |" in text
    assert "ort-cpu b8 ms" in text
    assert plt.imread(study_dir / "study.png").shape[0] > 100


def test_study_rerun_reads_finished_rows_without_training(study_dir: Path, tiny_cfg: Config, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a finished row was trained again")

    monkeypatch.setattr("rapc.study.rows.train", fail)
    monkeypatch.setattr("rapc.study.rows.resume_training", fail)
    monkeypatch.setattr(Trainer, "stage", fail)
    before = _report(study_dir)
    after = study(tiny_cfg, study_dir, OPTIONS).report
    assert after["rows"] == before["rows"] and after["dense"] == before["dense"]


def test_study_json_and_markdown_label_every_robust_figure_with_its_attack_and_n(study_dir: Path) -> None:
    report = _report(study_dir)
    n_test = report["n_test"]
    assert report["judge"]["level"] == "final" and report["judge"]["n_ensemble"] == N_ENSEMBLE
    text = (study_dir / "study.md").read_text()
    for row in report["dense"] + report["rows"]:
        (seed,) = row["seeds"]
        attacks = {a["name"]: a for a in seed["judge"]["attacks"]}
        assert set(attacks) == {"clean", "fgsm", "pgd", "ensemble"}
        assert attacks["pgd"]["label"].startswith("PGD-") and attacks["pgd"]["n"] == n_test
        assert "APGD-CE + APGD-T" in attacks["ensemble"]["label"] and attacks["ensemble"]["n"] == N_ENSEMBLE
        for attack in attacks.values():
            assert 0 <= attack["stderr"] < 0.5
        robust = row["robust"]  # the headline figure: the ensemble, with its label, n and standard error
        assert (robust["name"], robust["label"], robust["n"]) == ("ensemble", attacks["ensemble"]["label"], N_ENSEMBLE)
        assert (robust["mean"], robust["stderr"], robust["std"]) == (attacks["ensemble"]["accuracy"], attacks["ensemble"]["stderr"], None)
        assert not {"robust", "autoattack", "clean"} & set(seed)  # no figure without a label
        assert f"{robust['mean']:.1%} ± {robust['stderr'] * 100:.1f}" in text
    first = {a["name"]: a for a in report["dense"][0]["figures"]}
    assert f"| {first['pgd']['label']}, n={n_test} |" in text
    assert f"| {first['ensemble']['label']}, n={N_ENSEMBLE} |" in text
    assert f"clean, n={n_test}" in text and "| PGD |" not in text


def test_the_judge_runs_once_per_model_for_each_protocol_and_again_on_a_row_from_before_it(
        study_dir: Path, tiny_cfg: Config, tmp_path: Path, monkeypatch) -> None:
    out = shutil.copytree(study_dir, tmp_path / "copy")
    calls = []
    real = judged

    def counted(model_dir, cfg, data, protocol, device, reporter, title):
        calls.append(title)
        return real(model_dir, cfg, data, protocol, device, reporter, title)

    monkeypatch.setattr("rapc.study.run.judged", counted)
    study(tiny_cfg, out, OPTIONS)
    assert calls == []  # cached with the row for this protocol
    options = StudyOptions(ratios=(2.0,), schemes=("filter",), n_ensemble=3, backends=("ort-cpu",), batch_sizes=(1,), timing=QUICK)
    study(tiny_cfg, out, options)
    assert sorted(calls) == sorted(f"seed0/{n}" for n in ("dense-natural", "dense-robust", "dense-matched", *(f"r2-filter/{n}" for n in DEFAULT_ROWS)))
    judged_models = len(calls)
    study(tiny_cfg, out, options)
    assert len(calls) == judged_models
    row_file = _row_dir(out, "r2-filter/rapc") / "row.json"
    assert json.loads(row_file.read_text())["judge"]["robust"]["n"] == 3
    # a row.json written before the judge: unlabelled clean/robust/autoattack figures, judged again, not misread
    old = {k: v for k, v in json.loads(row_file.read_text()).items() if k not in ("judge", "judged_with")}
    row_file.write_text(json.dumps(old | {"clean": 0.9, "robust": 0.8, "autoattack": {"n": 3, "accuracy": 0.7}}))
    rows = _rows(study(tiny_cfg, out, options).out)
    assert calls[judged_models:] == ["seed0/r2-filter/rapc"]
    assert "judge" in rows["rapc"]["seeds"][0] and not {"clean", "robust", "autoattack"} & set(rows["rapc"]["seeds"][0])


def test_study_refuses_a_row_directory_made_with_another_config(study_dir: Path, tiny_cfg: Config) -> None:
    other = tiny_cfg.model_copy(deep=True)
    other.stages.admm.epochs = 2
    with pytest.raises(RapcError, match="another config"):
        study(other, study_dir, OPTIONS)


def test_a_row_claimed_before_a_config_key_was_added_is_still_read_without_training(study_dir: Path, tiny_cfg: Config,
                                                                                     tmp_path: Path, monkeypatch) -> None:
    out = shutil.copytree(study_dir, tmp_path / "copy")
    for claim in out.rglob("study-config.yaml"):  # as a rapc from before data.hflip wrote them
        text = claim.read_text()
        assert "  hflip: null\n" in text
        claim.write_text(text.replace("  hflip: null\n", ""))

    def fail(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr("rapc.study.rows.train", fail)
    monkeypatch.setattr("rapc.pipeline.trainer.train_epoch", fail)
    assert _rows(study(tiny_cfg, out, OPTIONS).out).keys() == _rows(study_dir).keys()
    set_differently = tiny_cfg.model_copy(update={"data": tiny_cfg.data.model_copy(update={"val_fraction": 0.2})})
    with pytest.raises(RapcError, match="another config"):  # a key the claim does give, with another value, is still refused
        study(set_differently, out, OPTIONS)


@pytest.mark.parametrize(("changes", "message"), [
    ({"ratios": (0.5,)}, "not a compression factor"),
    ({"schemes": ("bogus",)}, "pruning.scheme"),
    ({"rows": ("rapc", "nope")}, "unknown study row 'nope'"),
    ({"batch_sizes": (0,)}, "at least 1"),
    ({"n_ensemble": 0}, "n-ensemble"),
    ({"seeds": 0}, "seeds"),
    ({"backends": ("warp-drive",)}, "unknown bench backend"),
])
def test_study_rejects_bad_input_before_training(tiny_cfg: Config, tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(RapcError, match=message):
        study(tiny_cfg, tmp_path / "s", StudyOptions(**{"ratios": (2.0,), "schemes": ("filter",)} | changes))
    assert not (tmp_path / "s").exists()


def test_study_command_prints_the_table_of_a_finished_study(study_dir: Path) -> None:
    args = ["study", "-c", "digits-lenet-filter", "--ratios", "2", "--schemes", "filter", "--out", str(study_dir),
            "--n-ensemble", str(N_ENSEMBLE), "--seeds", "1", "--backends", "ort-cpu", "--batch-sizes", "1"]
    result = CliRunner().invoke(main, args + [arg for kv in TINY for arg in ("--set", kv)])
    assert result.exit_code == 0, result.output
    assert "inherited" in result.output and "finetune-standard" in result.output and "study.md" in result.output
    assert "APGD-CE" in result.output and "± " in result.output


def test_study_command_reports_a_bad_ratio_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["study", "-c", "digits-lenet-filter", "--ratios", "2,x", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "comma-separated numbers" in result.output


def test_a_pipeline_row_is_trained_by_compress_and_judged_once_by_the_study(study_dir: Path, tiny_cfg: Config, tmp_path: Path,
                                                                            monkeypatch) -> None:
    out = shutil.copytree(study_dir, tmp_path / "copy")
    shutil.rmtree(_row_dir(out, "r2-filter/rapc"))  # trained again; the shared dense models are read
    final = []
    real = judge.judge_loader

    def counting(model, data, protocol, *args, **kwargs):
        if protocol.level == "final":
            final.append(protocol)
        return real(model, data, protocol, *args, **kwargs)

    monkeypatch.setattr("rapc.judge.judge_loader", counting)
    monkeypatch.setattr("rapc.study.evaluation.judge_loader", counting)
    study(tiny_cfg, out, replace(OPTIONS, rows=("rapc",)))
    assert len(final) == 1 and final[0].n_ensemble == N_ENSEMBLE
    run = RunPaths(_row_dir(out, "r2-filter/rapc"))
    assert run.trained() is not None and run.summary() is None  # trained by compress, not judged by it
    row = json.loads((run.root / "row.json").read_text())
    assert row["judge"]["attacks"][-1]["n"] == N_ENSEMBLE


def test_study_row_without_its_result_file_is_remeasured_from_its_checkpoints(study_dir: Path, tiny_cfg: Config, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("trained again")

    before = _rows(study_dir)["scratch"]
    (_row_dir(study_dir, "r2-filter/scratch") / "row.json").unlink()  # as if killed after training, before writing it
    monkeypatch.setattr("rapc.study.rows.train", fail)
    monkeypatch.setattr("rapc.pipeline.trainer.train_epoch", fail)
    after = _rows(study(tiny_cfg, study_dir, OPTIONS).out)["scratch"]
    assert (after["params"], after["epochs"], after["train_seconds"]) == (before["params"], before["epochs"], before["train_seconds"])
    assert (_row_dir(study_dir, "r2-filter/scratch") / "row.json").is_file()


def test_seeds_train_every_model_again_per_seed_and_report_mean_and_std(study_dir: Path, tiny_cfg: Config, tmp_path: Path,
                                                                       monkeypatch) -> None:
    out = shutil.copytree(study_dir, tmp_path / "copy")  # seed 0 is read; seed 1 trains the dense models and one row
    before = (_row_dir(out, "r2-filter/oneshot-magnitude") / "row.json").read_text()
    options = StudyOptions(ratios=(2.0,), schemes=("filter",), rows=("oneshot-magnitude",), n_ensemble=N_ENSEMBLE, seeds=2,
                           backends=("ort-cpu",), batch_sizes=(1,), timing=QUICK)
    report = study(tiny_cfg, out, options).report
    assert report["seeds"] == [0, 1]
    assert (_row_dir(out, "r2-filter/oneshot-magnitude") / "row.json").read_text() == before
    for line in report["dense"] + report["rows"]:
        assert [row["seed"] for row in line["seeds"]] == [0, 1] and line["n_seeds"] == 2
        assert all((_row_dir(out, line["key"], seed) / "row.json").is_file() for seed in (0, 1))
        for figure in line["figures"]:
            each = [next(a for a in row["judge"]["attacks"] if a["name"] == figure["name"])["accuracy"] for row in line["seeds"]]
            assert figure["per_seed"] == each
            assert (figure["mean"], figure["std"]) == pytest.approx((fmean(each), stdev(each)))
    weights = [next(iter(load_model(final_model(_row_dir(out, "dense-robust", seed))).parameters())) for seed in (0, 1)]
    assert not torch.equal(*weights)  # another seed, another model
    text = (out / "study.md").read_text()
    assert "mean ± standard deviation across 2 seeds" in text and "(0, 1)" in text
    robust = report["rows"][0]["robust"]
    assert f"{robust['mean']:.1%} ± {robust['std'] * 100:.1f}" in text
    for line in report["dense"] + report["rows"]:  # each seed's attacks are seeded by it...
        assert [row["judged_with"]["protocol"]["seed"] for row in line["seeds"]] == [0, 1]

    def fail(*args, **kwargs):
        raise AssertionError("trained or judged again")

    # ... so seed 1 alone (another process, say) finds its rows finished and judged as --seeds 2 left them
    for name in ("rapc.study.rows.train", "rapc.pipeline.trainer.train_epoch", "rapc.study.run.judged"):
        monkeypatch.setattr(name, fail)
    alone = study(tiny_cfg.model_copy(update={"seed": 1}), out, replace(options, seeds=1)).report
    assert alone["seeds"] == [1]
    assert [line["robust"]["mean"] for line in alone["rows"]] == [line["robust"]["per_seed"][1] for line in report["rows"]]


def test_the_outside_audit_attacks_a_study_rows_model_beside_the_figure_the_study_reported(study_dir: Path) -> None:
    row_dir = _row_dir(study_dir, "r2-filter/scratch")
    done = subprocess.run([sys.executable, "benchmarks/audit_robustness.py", str(row_dir), "--n", str(N_ENSEMBLE)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    row = json.loads((row_dir / "row.json").read_text())
    assert record["model"] == "scratch" and record["n"] == N_ENSEMBLE and record["rapc reports"] == row["judge"]["robust"]
    assert record["audit"]["worst case"] <= record["audit"]["pgd-100x2"] <= record["audit"]["clean"]
