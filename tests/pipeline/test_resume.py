"""No lost work: real `rapc compress` processes killed (SIGKILL), interrupted (SIGINT) or fed a
diverging learning rate, then resumed, must end exactly where an uninterrupted run ends (CPU)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from rapc.cli import main

# Short stages, a checkpoint every 4 steps (digits: ~20 steps an epoch), a light evaluation.
SETTINGS = [
    "stages.pretrain.epochs=1", "stages.admm.epochs=3", "stages.retrain.epochs=3", "stages.checkpoint_every_steps=4",
    "eval.n_val=100", "eval.n_test=100", "attack.eval.steps=3",
]
ARGS = ["-c", "digits-lenet-filter", *[arg for s in SETTINGS for arg in ("--set", s)]]
TIMES = {"time", "train_seconds", "seconds"}


# One thread per run: this tiny model gains nothing from two, and two threads spin-waiting for a
# core that another process holds make a run several times slower on a busy 2-core machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rapc(*args: str) -> list[str]:
    return [sys.executable, "-m", "rapc", *args]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_rapc(*args), capture_output=True, text=True, timeout=300, env=ENV)


def _interrupt_when(out: Path, stage: str, sig: signal.Signals, *args: str) -> subprocess.CompletedProcess:
    """Run `rapc compress ARGS` and send ``sig`` as soon as a checkpoint of ``stage`` exists in ``out``."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:  # pipes could fill and block it
        proc = subprocess.Popen(_rapc("compress", *args), stdout=stdout, stderr=stderr, text=True, env=ENV)
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / f"{stage}.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"the run ended before a {stage} checkpoint appeared"
            time.sleep(0.005)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        stdout.seek(0), stderr.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout.read(), stderr.read())


def _assert_killed_inside(out: Path, stage: str, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _assert_no_partial_files(out)
    assert not _checkpoint(out, stage)["complete"] and not (out / "summary.json").exists()


def _checkpoint(run: Path, stage: str) -> dict:
    return torch.load(run / "checkpoints" / f"{stage}.pt", weights_only=True)


def _assert_no_partial_files(run: Path) -> None:
    """A kill may leave a temporary file beside a checkpoint, never in place of one; every checkpoint loads."""
    for tmp in run.rglob(".*.tmp"):
        assert (tmp.parent / tmp.name[1:].removesuffix(".tmp")).is_file(), tmp
    for checkpoint in (run / "checkpoints").glob("*.pt"):
        _checkpoint(run, checkpoint.stem)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES} for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_results(run: Path, reference: Path) -> None:
    for model in ("dense", "model"):
        ours, theirs = load_file(run / model / "weights.safetensors"), load_file(reference / model / "weights.safetensors")
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), f"{model}/{name}"
    ours, theirs = _checkpoint(run, "retrain")["extra"], _checkpoint(reference, "retrain")["extra"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert _metrics(run) == _metrics(reference)  # every epoch logged once, with the same figures
    assert not list(run.rglob(".*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    proc = _run("compress", *ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_a_run_killed_mid_admm_then_mid_retrain_resumes_to_the_same_model_masks_and_metrics(reference, tmp_path):
    out = tmp_path / "run"
    _assert_killed_inside(out, "admm", _interrupt_when(out, "admm", signal.SIGKILL, *ARGS, "--out", str(out)))
    assert not (out / "checkpoints" / "retrain.pt").exists()
    resumed = _interrupt_when(out, "retrain", signal.SIGKILL, "--resume", str(out))
    assert "admm: resuming" in resumed.stderr and "pretrain: complete" in resumed.stderr
    _assert_killed_inside(out, "retrain", resumed)
    proc = _run("compress", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "retrain: resuming" in proc.stderr and "admm: complete" in proc.stderr
    _assert_same_results(out, reference)


def test_ctrl_c_checkpoints_at_the_next_step_exits_130_with_the_resume_command(reference, tmp_path):
    out = tmp_path / "run"
    interrupted = _interrupt_when(out, "admm", signal.SIGINT, *ARGS, "--out", str(out))
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr.splitlines()[-1] == f"interrupted: `rapc compress --resume {out}` continues from the last checkpoint"
    assert "Traceback" not in interrupted.stderr
    checkpoint = _checkpoint(out, "admm")
    assert not checkpoint["complete"] and checkpoint["totals"] is not None  # saved where the loop stopped, inside the epoch
    proc = _run("compress", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    _assert_same_results(out, reference)


def test_resuming_a_finished_run_re_reports_it_without_training(reference):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, ["compress", "--resume", str(reference)])
    assert result.exit_code == 0, result.stderr
    assert "had already finished" in result.stderr and "dense vs compressed" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()} == before


def test_a_diverging_loss_stops_with_a_one_line_error_and_keeps_the_good_checkpoints(tmp_path):
    out = tmp_path / "run"
    proc = _run("compress", *ARGS, "--set", "stages.admm.optimizer.lr=1e6", "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: admm epoch 1: the training loss became nan by step "), proc.stderr
    _assert_no_partial_files(out)
    assert _checkpoint(out, "pretrain")["complete"]
    for checkpoint in (out / "checkpoints").glob("*.pt"):
        assert all(torch.isfinite(t).all() for t in _checkpoint(out, checkpoint.stem)["model"].values())


@pytest.mark.parametrize(
    "args, words",
    [
        (["--resume", "{run}", "--set", "pruning.ratio=0.7"], "drop --config, --set and --out"),
        (["--resume", "{tmp}/nothing"], "holds no run to resume"),
        (["-c", "digits-lenet-filter", "--out", "{run}"], "already holds a run: `rapc compress --resume"),
    ],
)
def test_resume_takes_the_run_as_it_is_and_a_new_run_never_overwrites_one(reference, tmp_path, args, words):
    args = [a.format(run=reference, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, ["compress", *args])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.stderr
    assert not (tmp_path / "nothing").exists()


def test_a_run_that_failed_on_its_input_before_training_can_be_started_again(tmp_path, digits_cfg):
    from rapc.errors import RapcError
    from rapc.rundir import RunDir

    RunDir(tmp_path / "run").start(digits_cfg)
    RunDir(tmp_path / "run").start(digits_cfg)  # only config.yaml: no work to lose
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RapcError, match="already holds a run"):
        RunDir(tmp_path / "run").start(digits_cfg)
