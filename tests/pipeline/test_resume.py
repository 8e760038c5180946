"""No lost work: real `rapc compress` processes, alone or under torchrun, killed (SIGKILL),
interrupted (SIGINT) or fed a diverging learning rate, then resumed, must end exactly where an
uninterrupted run ends (CPU)."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from rapc.cli import main
from rapc.modelio import ARCHITECTURE, WEIGHTS
from rapc.rundir import CHECKPOINT_FORMAT

# Short stages, a checkpoint every 4 steps (digits: ~20 steps an epoch), a light evaluation: the final
# judge's ensemble on 20 images (on 100 it took longer than all the training).
SETTINGS = [
    "stages.pretrain.epochs=1", "stages.admm.epochs=3", "stages.retrain.epochs=3", "stages.checkpoint_every_steps=4",
    "eval.n_val=100", "eval.n_test=100", "eval.n_ensemble=20", "attack.eval.steps=3",
]
ARGS = ["-c", "digits-lenet-filter", *[arg for s in SETTINGS for arg in ("--set", s)]]
TIMES = {"time", "train_seconds", "seconds"}
# Under torchrun (two ranks of batch 64, about a dozen steps an epoch each): shorter ADMM and retraining.
TORCHRUN_ARGS = [*ARGS, "--set", "stages.admm.epochs=2", "--set", "stages.retrain.epochs=1"]


# One thread per run: this tiny model gains nothing from two, and two threads spin-waiting for a
# core that another process holds make a run several times slower on a busy 2-core machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rapc(*args: str) -> list[str]:
    return [sys.executable, "-m", "rapc", *args]


def _torchrun(*args: str) -> list[str]:
    """`torchrun --nproc_per_node 2 -m rapc ARGS` (gloo on CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "rapc", *args]


def _run(*args: str, launch: Callable[..., list[str]] = _rapc) -> subprocess.CompletedProcess:
    return subprocess.run(launch(*args), capture_output=True, text=True, timeout=300, env=ENV)


def _signal(sig: signal.Signals) -> Callable[[subprocess.Popen], None]:
    """Send ``sig`` to the process group of the command, as a terminal does to its foreground job."""
    return lambda proc: os.killpg(proc.pid, sig)


def _foreground() -> None:
    """In the child: SIGINT handled as a terminal's foreground job has it, even when pytest runs as a
    background job (SIGINT ignored, and an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_with_children(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks (each in a process group of its own), as a crash of the machine would."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    proc.kill()
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)


def _interrupt_when(out: Path, stage: str, stop: Callable[[subprocess.Popen], None], command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` in a session of its own and ``stop`` it as soon as a checkpoint of ``stage`` exists in ``out``."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:  # pipes could fill and block it
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=ENV, start_new_session=True,
                                preexec_fn=_foreground)
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / f"{stage}.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"the run ended before a {stage} checkpoint appeared"
            time.sleep(0.005)
        stop(proc)
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
    """A kill may leave a temporary file, never a partial one in place: every checkpoint loads, and every
    model directory with its architecture record (written last: a resume counts the model as saved only
    then) has whole weights. A temporary file beside no file is a first write cut short: a first
    checkpoint, or the weights of a model not yet recorded."""
    for tmp in run.rglob(".*.tmp"):
        assert (tmp.parent / tmp.name[1:].removesuffix(".tmp")).is_file() or not (tmp.parent / ARCHITECTURE).is_file(), tmp
    for checkpoint in (run / "checkpoints").glob("*.pt"):
        _checkpoint(run, checkpoint.stem)
    for record in run.glob(f"*/{ARCHITECTURE}"):
        load_file(record.parent / WEIGHTS)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES} for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_results(run: Path, reference: Path, loss_rel: float = 0.0) -> None:
    """The same weights and masks, and the same metrics; the logged training loss up to ``loss_rel``
    where a resumed torchrun's rank 0 continued the loss summed over ranks (rounded otherwise than
    adding the ranks' sums at the end of the epoch)."""
    for model in ("pretrained", "dense", "compressed"):
        ours, theirs = load_file(run / model / "weights.safetensors"), load_file(reference / model / "weights.safetensors")
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), f"{model}/{name}"
    ours, theirs = _checkpoint(run, "retrain")["extra"], _checkpoint(reference, "retrain")["extra"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    ours, theirs = _metrics(run), _metrics(reference)
    if loss_rel:
        assert [m.pop("loss", 0.0) for m in ours] == pytest.approx([m.pop("loss", 0.0) for m in theirs], rel=loss_rel)
    assert ours == theirs  # every epoch logged once, with the same figures
    assert not list(run.rglob(".*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    proc = _run("compress", *ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_a_run_killed_mid_admm_then_mid_retrain_resumes_to_the_same_model_masks_and_metrics(reference, tmp_path):
    out = tmp_path / "run"
    _assert_killed_inside(out, "admm", _interrupt_when(out, "admm", _signal(signal.SIGKILL), _rapc("compress", *ARGS, "--out", str(out))))
    assert not (out / "checkpoints" / "retrain.pt").exists()
    resumed = _interrupt_when(out, "retrain", _signal(signal.SIGKILL), _rapc("compress", "--resume", str(out)))
    assert "admm: resuming" in resumed.stderr and "pretrain: complete" in resumed.stderr
    _assert_killed_inside(out, "retrain", resumed)
    proc = _run("compress", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "retrain: resuming" in proc.stderr and "admm: complete" in proc.stderr
    _assert_same_results(out, reference)


def _complete(run: Path, stage: str) -> bool:
    """Whether ``stage``'s checkpoint says the stage finished (checkpoints are renamed into place whole)."""
    try:
        return bool(_checkpoint(run, stage)["complete"])
    except (FileNotFoundError, RuntimeError, EOFError):  # not there yet, or replaced while being read
        return False


def _kill_at_boundary(out: Path, stage: str, command: list[str]) -> subprocess.CompletedProcess:
    """SIGKILL ``command`` as soon as ``stage``'s checkpoint is complete: between stages, the next not yet checkpointed."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=ENV, start_new_session=True)
        deadline = time.monotonic() + 120
        while not _complete(out, stage):
            assert proc.poll() is None and time.monotonic() < deadline, f"the run ended before {stage} was complete"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)
        stderr.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr.read())


# The stages in the order they run, each killed right after its last checkpoint.
BOUNDARIES = [("pretrain", "admm"), ("admm", "retrain"), ("retrain", "dense-admm"), ("dense-admm", "dense-retrain")]


def test_a_run_killed_at_every_stage_boundary_resumes_to_the_uninterrupted_weights_bit_for_bit(reference, tmp_path):
    """Killed after one stage's last checkpoint and before the next's first epoch ended, a resume must start
    the next stage where the uninterrupted run did: its generators and its shuffle order included."""
    out = tmp_path / "run"
    # Checkpoints at epoch ends only (they change nothing trained): the next stage then leaves no trace before its first epoch ends.
    command = _rapc("compress", *ARGS, "--set", "stages.checkpoint_every_steps=null", "--out", str(out))
    for done, following in BOUNDARIES:
        killed = _kill_at_boundary(out, done, command)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not (out / "checkpoints" / f"{following}.pt").exists(), f"killed after {following} had begun"
        _assert_no_partial_files(out)
        command = _rapc("compress", "--resume", str(out))
    proc = _run("compress", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "dense-admm: complete" in proc.stderr
    _assert_same_results(out, reference)


# Free replays starting from carried perturbations: both recipes' state (the store, the replayed schedule) in one run.
FAST_ARGS = [*ARGS, "--set", "attack.train.method=free", "--set", "attack.train.steps=2", "--set", "attack.train.carry=true",
             "--set", "stages.dense_control=false"]


def test_a_run_with_carried_perturbations_killed_mid_epoch_resumes_bit_for_bit(tmp_path):
    reference = tmp_path / "uninterrupted"
    proc = _run("compress", *FAST_ARGS, "--out", str(reference))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "run"
    _assert_killed_inside(out, "admm", _interrupt_when(out, "admm", _signal(signal.SIGKILL), _rapc("compress", *FAST_ARGS, "--out", str(out))))
    store = _checkpoint(out, "admm")["store"]
    assert 0 < store["visited"].sum() < len(store["visited"])  # (pretraining is clean here) ADMM's first steps attacked some examples
    proc = _run("compress", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "admm: resuming epoch" in proc.stderr
    _assert_same_results(out, reference)
    assert torch.equal(_checkpoint(out, "retrain")["store"]["codes"], _checkpoint(reference, "retrain")["store"]["codes"])


def test_a_torchrun_of_two_processes_trains_with_carried_perturbations(tmp_path):
    """Each rank attacks its own shard; the checkpoint gathers them into one store of every training example."""
    out = tmp_path / "run"
    proc = _run("compress", *TORCHRUN_ARGS, "--set", "attack.train.carry=true", "--set", "attack.train.steps=1",
                "--set", "stages.dense_control=false", "--out", str(out), launch=_torchrun)
    assert proc.returncode == 0, proc.stderr
    store = _checkpoint(out, "retrain")["store"]
    assert store["visited"].all() and store["codes"].abs().max() > 0
    assert all("guard_pgd" in m for m in _metrics(out) if m.get("train_eps"))  # the overfitting guard watched every adversarial epoch


def test_ctrl_c_checkpoints_at_the_next_step_exits_130_with_the_resume_command(reference, tmp_path):
    out = tmp_path / "run"
    interrupted = _interrupt_when(out, "admm", _signal(signal.SIGINT), _rapc("compress", *ARGS, "--out", str(out)))
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr.splitlines()[-1] == f"interrupted: `rapc compress --resume {out}` continues from the last checkpoint"
    assert "Traceback" not in interrupted.stderr
    checkpoint = _checkpoint(out, "admm")
    assert not checkpoint["complete"] and checkpoint["totals"] is not None  # saved where the loop stopped, inside the epoch
    proc = _run("compress", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    _assert_same_results(out, reference)


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "torchrun"
    proc = _run("compress", *TORCHRUN_ARGS, "--out", str(out), launch=_torchrun)
    assert proc.returncode == 0, proc.stderr
    return out


def test_a_torchrun_killed_mid_admm_then_interrupted_mid_retrain_resumes_to_the_same_masks_weights_and_metrics(torchrun_reference, tmp_path):
    """Each rank's random starts go on from its own saved generators, so the result is the uninterrupted one."""
    out = tmp_path / "run"
    killed = _interrupt_when(out, "admm", _kill_with_children, _torchrun("compress", *TORCHRUN_ARGS, "--out", str(out)))
    _assert_killed_inside(out, "admm", killed)
    interrupted = _interrupt_when(out, "retrain", _signal(signal.SIGINT), _torchrun("compress", "--resume", str(out)))
    # torchrun forwards the SIGINT to every rank, waits for them to checkpoint and exit 130, then raises its
    # own SignalException: status 1 and torchrun's traceback, none of rapc's.
    assert interrupted.returncode == 1, interrupted.stderr
    message = f"interrupted: `torchrun --nproc_per_node 2 -m rapc compress --resume {out}` continues from the last checkpoint"
    assert interrupted.stderr.count(message) == 1, interrupted.stderr
    assert not re.search(r'File "[^"]*/rapc/', interrupted.stderr) and "KeyboardInterrupt" not in interrupted.stderr
    assert "admm: resuming" in interrupted.stderr and not list(out.rglob(".*.tmp"))
    assert not _checkpoint(out, "retrain")["complete"]
    proc = _run("compress", "--resume", str(out), launch=_torchrun)
    assert proc.returncode == 0, proc.stderr
    assert "retrain: resuming" in proc.stderr and "admm: complete" in proc.stderr
    _assert_same_results(out, torchrun_reference, loss_rel=1e-6)


def test_a_run_of_one_process_killed_mid_admm_resumes_under_torchrun_with_two(torchrun_reference, tmp_path):
    """Rank 1 finds no generators of its own in the checkpoint and is seeded as at the start of a run."""
    out = tmp_path / "run"
    _assert_killed_inside(out, "admm", _interrupt_when(out, "admm", _signal(signal.SIGKILL), _rapc("compress", *TORCHRUN_ARGS, "--out", str(out))))
    proc = _run("compress", "--resume", str(out), launch=_torchrun)
    assert proc.returncode == 0, proc.stderr
    assert "admm: resuming epoch 1 at step" in proc.stderr and (out / "summary.json").is_file()
    assert [(m["stage"], m.get("epoch")) for m in _metrics(out)] == [(m["stage"], m.get("epoch")) for m in _metrics(torchrun_reference)]


@pytest.mark.parametrize(
    "checkpoint",
    [
        {"model": {}, "metrics_bytes": 0},
        {"format": CHECKPOINT_FORMAT, "metrics_bytes": 0},
        {"format": CHECKPOINT_FORMAT, "metrics_bytes": 0, "model": {"conv1.weight": torch.zeros(1)}},
    ],
    ids=["older, without a format", "keys missing", "a model of another shape"],
)
def test_a_checkpoint_of_another_rapc_version_is_refused_in_one_line(tmp_path, digits_cfg, checkpoint):
    from rapc.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.start(digits_cfg)
    torch.save(checkpoint, run.checkpoint("pretrain"))
    result = CliRunner().invoke(main, ["compress", "--resume", str(run.root)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: checkpoint {run.checkpoint('pretrain')} was written by another version of rapc; start a new run"], result.stderr


def test_resuming_a_finished_run_re_reports_it_without_training(reference):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, ["compress", "--resume", str(reference)])
    assert result.exit_code == 0, result.stderr
    assert "had already finished" in result.stderr and "dense vs compressed" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()} == before


def test_a_run_killed_in_its_final_judge_resumes_without_judging_again_what_it_had_judged(reference, tmp_path, monkeypatch):
    """Killed while judging the compressed model: the dense model's saved judgement is reused, bit for bit."""
    import shutil

    from rapc import judge

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "summary.json").unlink()
    (out / "judgement" / "compressed.safetensors").unlink()
    judged, judge_loader = [], judge.judge_loader
    monkeypatch.setattr(judge, "judge_loader", lambda *a, **k: judged.append(k["title"]) or judge_loader(*a, **k))
    result = CliRunner().invoke(main, ["compress", "--resume", str(out)])
    assert result.exit_code == 0, result.stderr
    assert judged == ["compressed"] and "dense: reused the judgement this run saved before" in result.stderr
    summary, expected = (json.loads((run / "summary.json").read_text()) for run in (out, reference))
    assert summary["dense"]["judge"] == expected["dense"]["judge"]  # the saved verdict itself, its seconds too
    figures = [[(a["label"], a["n"], a["accuracy"]) for a in run["compressed"]["judge"]["attacks"]] for run in (summary, expected)]
    assert figures[0] == figures[1]  # judged again: the same figures, the judge being seeded


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
        (["--resume", "{tmp}/nothing"], "not a run directory"),
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
