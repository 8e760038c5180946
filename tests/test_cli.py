"""The real console script, end to end, in a subprocess."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rapc
from click.testing import CliRunner
from rapc.cli import main
from rapc.modelio import load_model

RAPC = [shutil.which("rapc") or str(Path(sys.executable).with_name("rapc"))]


def _run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*RAPC, *args], capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The whole run with stdout and stderr to pipes, as in CI or `| tee`; 40 columns makes rich wrap any line it would wrap."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    return out, _run("compress", "-c", "digits-lenet-filter", "--out", str(out), env=os.environ | {"COLUMNS": "40"})


def test_compress_runs_end_to_end_on_digits(digits_run):
    out, proc = digits_run
    assert proc.returncode == 0, proc.stderr
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/admm.pt", "checkpoints/retrain.pt",
                 "dense/architecture.json", "dense/weights.safetensors", "compressed/architecture.json", "compressed/weights.safetensors", "pretrained/weights.safetensors"):
        assert (out / name).is_file(), name
    assert "dense vs compressed" in proc.stdout and "PGD acc" not in proc.stdout
    # every robust figure names its attack and n: the judge's PGD (restarts, rule step) and the ensemble
    assert "PGD-10x2 step 0.025 (eps 0.1, n=360)" in proc.stdout and "APGD-CE + APGD-T (100 steps, 9 targets)" in proc.stdout
    assert "dense: a budget-matched control" in proc.stdout


def test_a_log_to_a_pipe_has_one_whole_line_per_epoch_and_no_progress_bar(digits_run):
    out, proc = digits_run
    lines = proc.stderr.splitlines()
    epochs = [line for line in lines if re.match(r"(pretrain|admm|retrain|dense-admm|dense-retrain) +\d+/\d+ ", line)]
    assert [line.split()[0] for line in epochs] == (["pretrain"] * 6 + ["admm"] * 4 + ["retrain"] * 3
                                                    + ["dense-admm"] * 4 + ["dense-retrain"] * 3), proc.stderr
    # validated: the epochs at full eps of stages that keep their best, and every stage's last (digits: 2 clean pretraining epochs)
    validated = [False] * 2 + [True] * 4 + [False] * 3 + [True] + [True] * 3 + [False] * 3 + [True] + [True] * 3
    for line, shows_validation in zip(epochs, validated, strict=True):
        assert "loss" in line and re.search(r"  \d+s$", line), line
        assert ("val clean" in line and "PGD-10x2 step 0.025" in line) == shows_validation, line
        if line.startswith("admm"):
            assert re.search(r"  rho \S+  residual \d\.\d{3}  \d+s$", line), line
    fragments = [line for line in lines if re.match(r"\s*(rho|residual|val clean|acc|\d+s$)", line)]
    assert not fragments, proc.stderr
    assert lines[0].startswith("rapc compress: lenet") and lines[0].endswith(f"-> {out}")  # the heading is whole too
    assert "\x1b" not in proc.stderr and "━" not in proc.stderr  # no cursor control, no bar


def test_compress_writes_one_metrics_line_per_epoch_with_admm_residuals(digits_run):
    out, _ = digits_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records]
    assert stages == ["pretrain"] * 6 + ["admm"] * 4 + ["hard_prune"] + ["retrain"] * 3 + ["dense-admm"] * 4 + ["dense-retrain"] * 3
    admm = [r for r in records if r["stage"] == "admm"]
    assert set(admm[0]["residuals"]) == {"conv1", "conv2", "fc1"}
    assert admm[-1]["rho"] > admm[0]["rho"]
    retrain = [r for r in records if r["stage"] == "retrain"]
    assert all(r["sparsity"] == pytest.approx(retrain[0]["sparsity"]) and r["sparsity"] > 0.3 for r in retrain)


def test_the_summary_and_the_output_say_where_the_time_went(digits_run):
    out, proc = digits_run
    seconds = json.loads((out / "summary.json").read_text())["seconds"]
    assert list(seconds) == ["pretrain", "admm", "retrain", "dense control", "final judge"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for stage, prefix in (("pretrain", "pretrain"), ("admm", "admm"), ("retrain", "retrain"), ("dense control", "dense-")):
        logged = sum(r["seconds"] for r in records if r["stage"].startswith(prefix) and "epoch" in r)
        assert seconds[stage] == pytest.approx(logged) and logged > 0, stage
    assert seconds["final judge"] > 0
    assert re.search(r"time: pretrain \d+ s · admm \d+ s · .* final judge \d+ s \(\d+\.\d min in all\)", " ".join(proc.stdout.split()))


def test_the_dense_baseline_trained_as_long_as_the_compressed_model(digits_run):
    """The dense figures come from the pretrained model trained on, unpruned, through the ADMM and
    retraining stages' schedules: the comparison is at an equal training budget and says so."""
    out, _ = digits_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"].startswith("a budget-matched control")
    pretrained, dense = load_model(out / "pretrained"), load_model(out / "dense")
    assert any(not torch.equal(a, b) for a, b in zip(pretrained.state_dict().values(), dense.state_dict().values()))
    assert dense.conv1.weight.shape == pretrained.conv1.weight.shape


def test_compressed_model_is_smaller_and_still_robust(digits_run):
    out, _ = digits_run
    summary = json.loads((out / "summary.json").read_text())
    dense, compressed = summary["dense"], summary["compressed"]
    assert compressed["macs"] < dense["macs"] / 3 and compressed["params"] < dense["params"] / 3
    assert compressed["file_bytes"] < dense["file_bytes"] / 3
    assert compressed["clean"] > 0.8
    assert 0.2 < compressed["robust"] < compressed["clean"]
    attacks = {a["name"]: a for a in compressed["judge"]["attacks"]}
    assert compressed["robust"] == attacks["ensemble"]["accuracy"] <= attacks["pgd"]["accuracy"] <= attacks["fgsm"]["accuracy"]
    assert all(a["n"] == 360 and "label" in a and "stderr" in a for a in attacks.values())
    assert summary["shrink"]["max_abs_diff"] < 1e-4


def test_load_model_returns_the_runnable_shrunk_model(digits_run, digits_batch):
    out, _ = digits_run
    model = rapc.load_model(out)
    summary = json.loads((out / "summary.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == summary["compressed"]["params"]
    x, y = digits_batch
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy == pytest.approx(summary["compressed"]["clean"], abs=1e-6)


def test_resolved_config_is_written_and_reloadable(digits_run):
    out, _ = digits_run
    proc = _run("compress", "-c", str(out / "config.yaml"), "--set", "stages.pretrain.epochs=0", "--set", "stages.admm.epochs=0",
                "--set", "stages.retrain.epochs=0", "--set", f"stages.start_from={out}", "--out", str(out.parent / "again"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out.parent / "again" / "summary.json").read_text())["dense"]["clean"] == pytest.approx(
        json.loads((out / "summary.json").read_text())["dense"]["clean"])


@pytest.mark.parametrize(
    "args, words",
    [
        (["--set", "pruning.ratio=1.5"], "pruning.ratio"),
        (["--set", "attack.eval.eps=-1"], "attack.eval.eps"),
        (["--set", "data.name=imagenet"], "unknown dataset 'imagenet'"),
        (["--set", "model.name=alexnet"], "unknown model 'alexnet'"),
        (["--set", "model.name=os:system"], "allow_import"),
        (["-c", "nope.yaml"], "does not exist"),
        (["--set", "data.name=cifar10", "--set", "data.root=/nonexistent"], "set data.download=true"),
        (["--set", "stages.start_from=/nonexistent"], "does not exist"),
        (["--set", "model.name=resnet18", "--set", "data.name=digits", "--set", "model.kwargs={depth: 3}"], "bad arguments"),
        (["--set", "device=cuda:0"], "no CUDA GPU") if not torch.cuda.is_available() else (["--set", "device=tpu"], "not a device"),
    ],
)
def test_user_mistakes_are_one_line_errors_with_exit_code_2(tmp_path, args, words):
    """In-process through the same click group as the console script (the subprocess case is below)."""
    result = CliRunner().invoke(main, ["compress", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], result.stderr


def test_console_script_reports_a_bad_config_and_an_unwritable_directory_without_traceback(tmp_path):
    proc = _run("compress", "--set", "pruning.ratio=1.5")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "pruning.ratio" in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _run("compress", "-c", "digits-lenet-filter", "--out", str(blocker / "run"))
    assert proc.returncode == 2 and "cannot write to" in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains_every_option():
    top = _run("--help")
    assert top.returncode == 0 and "compress" in top.stdout
    sub = _run("compress", "--help")
    for option in ("--config", "--set", "--out", "mnist-lenet-filter", "KEY=VALUE"):
        assert option in sub.stdout


def test_a_target_run_with_round_to_meets_the_budget_in_multiples_of_n_and_says_so(tmp_path):
    """`rapc compress --target` with pruning.round_to: every group of the saved model keeps a multiple of 4 channels
    (digits LeNet w=4: conv1 8, conv2 16, fc1 256), the MAC budget is met on the final models, and the summary and
    the output say the rounding."""
    out = tmp_path / "run"
    short = ["stages.pretrain.epochs=2", "stages.admm.epochs=1", "stages.retrain.epochs=1", "stages.dense_control=false",
             "eval.n_val=100", "eval.n_test=100", "eval.n_ensemble=10", "pruning.round_to=4"]
    result = CliRunner().invoke(main, ["compress", "-c", "digits-lenet-filter", "--target", "macs=0.3", "--out", str(out),
                                       *(arg for s in short for arg in ("--set", s))])
    assert result.exit_code == 0, result.output[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    budget = summary["budget"]
    assert budget["round_to"] == 4 and budget["metric"] == "macs" and abs(budget["achieved"] / 0.3 - 1) <= 0.02, budget
    assert budget["achieved"] == summary["compressed"]["macs"] / summary["dense"]["macs"]
    model = load_model(out)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(m.weight.shape[0] % 4 == 0 for m in layers[:-1]) and layers[-1].weight.shape[0] == 10
    assert [m.weight.shape[0] for m in layers[:-1]] != [8, 16, 256]  # pruned, not left dense
    (note,) = [n for n in summary["notes"] if n.startswith("pruning.round_to=4")]
    printed = " ".join(result.output.split())  # rich wraps long lines at the terminal's width
    assert f"note: {note}" in printed and "groups kept in multiples of 4 channels" in printed
