"""`rapc compress --weights FILE`: a user's own plain-PyTorch CNN, defined in their own module and
trained outside rapc (here: a few FGSM epochs on digits in the test itself), pruned from its
weights file. A file rapc must not or cannot load, and a start model that is not robust, are one
`error:` line and exit code 2. Export and bench on such a run: the worked example, test_examples.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from rapc.cli import main
from rapc.config import load_config
from rapc.data import load_data, loader
from rapc.modelio import load_model

RAPC = shutil.which("rapc") or str(Path(sys.executable).with_name("rapc"))
MODULE = "rapc_test_own_nets"  # the user's module, importable through PYTHONPATH

NETS = '''
import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two convolutions and a linear head; takes [0,1] pixels as they come."""

    def __init__(self, num_classes=10, in_channels=1, channels=16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * channels * 16, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def small_cnn(num_classes=10, in_channels=1, channels=16):
    return SmallCNN(num_classes, in_channels, channels)
'''

# The user's model trained on raw pixels, so rapc must not normalize in front of it (model.normalize: none).
CONFIG = f"""
seed: 0
device: cpu
data: {{name: digits, batch_size: 64, eval_batch_size: 360}}
model: {{name: "{MODULE}:small_cnn", allow_import: true, normalize: none}}
attack:
  train: {{method: fgsm, eps: 0.1}}
  eval: {{method: pgd, eps: 0.1, steps: 10}}
stages:
  admm: {{epochs: 1, optimizer: {{name: sgd, lr: 0.01, momentum: 0.9}}, schedule: {{name: constant}}}}
  retrain: {{epochs: 1, optimizer: {{name: adam, lr: 0.001}}, schedule: {{name: constant}}}}
pruning: {{scheme: filter, ratio: 0.5}}
admm: {{rho: 0.3}}
eval: {{n_val: 100, n_test: 100, n_ensemble: 20, n_start: 100}}
"""
NOTHING_AFTER_PRUNING = ("--set", "stages.admm.epochs=0", "--set", "stages.retrain.epochs=0")


def _train(net: nn.Module, epochs: int, eps: float) -> dict[str, torch.Tensor]:
    """The user's own training loop, outside rapc: FGSM from a random start (eps 0: clean inputs)."""
    splits = load_data(load_config("digits-lenet-filter").data, seed=0)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(epochs):
        for x, y in loader(splits.train, 64, shuffle=True, seed=epoch):
            if eps > 0:
                delta = ((torch.rand_like(x) * 2 - 1) * eps).requires_grad_(True)
                grad, = torch.autograd.grad(nn.functional.cross_entropy(net((x + delta).clamp(0, 1)), y), delta)
                x = (x + (delta + 1.25 * eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1).detach()
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's folder: their model module, a config, and weights trained robustly and cleanly."""
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(NETS))
    (folder / "tiny.yaml").write_text(CONFIG)
    sys.path.insert(0, str(folder))  # for the in-process runs; the console script gets PYTHONPATH
    module = __import__(MODULE)
    robust = _train(module.small_cnn(), epochs=6, eps=0.1)
    torch.save({"module." + k: v for k, v in robust.items()}, folder / "robust.pt")  # as saved from DataParallel
    save_file(robust, str(folder / "robust.safetensors"))
    clean = _train(module.small_cnn(), epochs=4, eps=0.0)
    torch.save({"epoch": 4, "model_state_dict": clean, "optimizer": {"lr": 3e-3}}, folder / "clean.pt")
    torch.save(module.small_cnn(), folder / "whole.pt")  # torch.save(model): a pickled module
    torch.save(module.small_cnn(channels=4).state_dict(), folder / "narrow.pt")  # another width
    yield folder, robust
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


def _rapc(*args: str, folder: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "200"}
    return subprocess.run([RAPC, *args], capture_output=True, text=True, timeout=600, env=env, cwd=folder)


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    return errors[0]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pt_run(user):
    folder, _ = user
    out = folder / "run-pt"
    proc = _rapc("compress", "--weights", str(folder / "robust.pt"), "-c", str(folder / "tiny.yaml"), "--target", "macs=0.5",
                 "--set", "pruning.allocation=sensitivity", "--out", str(out), folder=folder)
    return out, proc


def test_compress_starts_from_a_data_parallel_state_dict_of_the_users_own_model(user, pt_run):
    _, robust = user
    out, proc = pt_run
    assert proc.returncode == 0, proc.stderr
    pretrained = load_model(out / "pretrained", allow_import=True)
    assert type(pretrained).__name__ == "SmallCNN"  # normalize none: the user's net itself, their own keys
    state = pretrained.state_dict()
    assert state.keys() == robust.keys() and all(torch.equal(state[k], robust[k]) for k in robust)



def test_the_macs_target_is_met_within_two_percent_and_reported(pt_run):
    out, proc = pt_run
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    dense, compressed = load_model(out / "dense", allow_import=True), load_model(out, allow_import=True)
    assert compressed.conv1.out_channels < dense.conv1.out_channels and compressed.conv2.out_channels < dense.conv2.out_channels
    kept = summary["compressed"]["macs"] / summary["dense"]["macs"]
    assert abs(kept / 0.5 - 1) <= 0.02, kept
    budget = summary["budget"]
    assert budget["metric"] == "macs" and budget["target"] == 0.5 and budget["achieved"] == kept and budget["reason"] is None
    assert budget["method"] == "sensitivity"  # as the command asks (uniform is the default)
    assert f"budget: {kept:.3f} of the dense model's macs kept (target 0.500; sensitivity allocation" in proc.stdout
    assert {"allocation.json", "allocation.md", "sensitivity.png"} <= {p.name for p in (out / "allocation").iterdir()}


def test_the_start_model_is_judged_before_pruning_and_is_the_baseline(pt_run):
    out, proc = pt_run
    assert [r["stage"] for r in _records(out)][:2] == ["allocation", "admm"]  # no pretraining: --weights sets 0 epochs
    start = json.loads((out / "start_check.json").read_text())
    assert json.loads((out / "summary.json").read_text())["start_check"] == start
    assert start["n"] == 100 and start["robust"] > 0.3 and "APGD-CE + APGD-T" in start["robust_attack"]
    assert f"start model: clean {start['clean']:.1%}, {start['robust_attack']} {start['robust']:.1%} (n=100)" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == (f"the given weights ({out.parent / 'robust.pt'}), trained outside rapc: their training budget "
                                   f"is unknown, so not budget-matched")
    assert f"dense: {summary['baseline']}" in proc.stdout
    dense, pretrained = load_model(out / "dense", allow_import=True), load_model(out / "pretrained", allow_import=True)
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), pretrained.state_dict().values(), strict=True))


def test_the_start_check_is_kept_by_a_resume_from_before_the_first_admm_checkpoint(pt_run, tmp_path):
    """Killed after the check passed and before ADMM's first checkpoint: the resume cuts metrics.jsonl to
    nothing and does not judge the start again, yet the summary still gives the check's figures."""
    out = shutil.copytree(pt_run[0], tmp_path / "run")
    start = json.loads((out / "start_check.json").read_text())
    for finished in ("summary.json", "trained.json", "dense", "compressed", "export", "bench"):
        shutil.rmtree(out / finished, ignore_errors=True) if (out / finished).is_dir() else (out / finished).unlink(missing_ok=True)
    for checkpoint in (out / "checkpoints").glob("*.pt"):
        checkpoint.unlink()
    result = _invoke("compress", "--resume", str(out))
    assert result.exit_code == 0, result.output
    assert "start model:" not in result.output  # not judged again
    assert json.loads((out / "summary.json").read_text())["start_check"] == start


def test_a_safetensors_file_is_a_start_too(user):
    folder, robust = user
    out = folder / "run-safetensors"
    result = _invoke("compress", "--weights", str(folder / "robust.safetensors"), "-c", str(folder / "tiny.yaml"),
                     *NOTHING_AFTER_PRUNING, "--force", "--out", str(out))
    assert result.exit_code == 0, result.output
    state = load_model(out / "pretrained", allow_import=True).state_dict()
    assert all(torch.equal(state[k], robust[k]) for k in robust)
    assert not (out / "start_check.json").exists() and json.loads((out / "summary.json").read_text())["start_check"] is None  # --force


def test_a_start_model_trained_on_clean_inputs_only_is_refused_and_accepted_with_force(user):
    folder, _ = user
    common = ("--weights", str(folder / "clean.pt"), "-c", str(folder / "tiny.yaml"), "--set", "attack.eval.eps=0.3",
              "--set", "attack.train.eps=0.3")
    refused = _invoke("compress", *common, "--out", str(folder / "refused"))
    error = _one_error_line(refused)
    assert error.startswith("error: the start model holds ") and ("% of ensemble PGD-10x2 step 0.075 + APGD-CE + APGD-T (100 steps, "
                                                                  "9 targets) at eps 0.3 (100 validation images): it is not robust") in error
    assert "--set stages.pretrain.epochs=N" in error and "--force" in error
    assert not (folder / "refused" / "pretrained").exists()
    forced = _invoke("compress", *common, *NOTHING_AFTER_PRUNING, "--force", "--out", str(folder / "forced"))
    assert forced.exit_code == 0, forced.output
    assert (folder / "forced" / "compressed" / "weights.safetensors").is_file()


def test_set_after_weights_trains_the_given_model_first_and_the_check_judges_the_result(user):
    """--weights sets stages.pretrain.epochs=0 before the --set overrides: --set gives it epochs back."""
    folder, _ = user
    out = folder / "tuned"
    result = _invoke("compress", "--weights", str(folder / "clean.pt"), "-c", str(folder / "tiny.yaml"), "--set", "attack.eval.eps=0.3",
                     "--set", "stages.pretrain.epochs=1", "--set", "stages.pretrain.clean_epochs=1", "--out", str(out))
    assert "it is not robust" in _one_error_line(result)  # one clean epoch buys no robustness
    assert [r["stage"] for r in _records(out)] == ["pretrain"]  # trained first, then judged and refused
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.stages.start_from == str(folder / "clean.pt") and cfg.stages.pretrain.epochs == 1 and cfg.stages.check_start


@pytest.mark.parametrize("file, words", [
    ("whole.pt", ["whole.pt is a pickled Python object (it needs", "SmallCNN", "torch.save(model.state_dict(), 'whole.pt')"]),
    ("narrow.pt", ["narrow.pt: tensor conv1.weight has shape [4, 1, 3, 3], the model expects [16, 1, 3, 3]; in all 5 mis-shaped",
                   "fc.weight: file [10, 128], model [10, 512]"]),
    ("missing.pt", ["--weights", "missing.pt: no such file"]),
    ("robust.onnx", ["--weights", "expected a .safetensors, .pt, .pth file"]),
])
def test_a_file_rapc_cannot_load_is_one_error_line(user, file, words):
    folder, _ = user
    out = folder / f"bad-{file}"
    error = _one_error_line(_invoke("compress", "--weights", str(folder / file), "-c", str(folder / "tiny.yaml"), "--out", str(out)))
    for word in words:
        assert word in error, error
    assert not (out / "metrics.jsonl").exists()  # nothing was trained


def test_the_console_script_refuses_a_pickled_module_in_one_line(user):
    folder, _ = user
    proc = _rapc("compress", "--weights", str(folder / "whole.pt"), "-c", str(folder / "tiny.yaml"), "--out", str(folder / "p"),
                 folder=folder)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pickled Python object" in errors[0], proc.stderr


@pytest.mark.parametrize("args, words", [
    (["--target", "macs"], "--target macs: expected METRIC=FRACTION"),
    (["--target", "flops=0.5"], "METRIC one of macs, params, latency"),
    (["--target", "params=1.5"], "FRACTION in (0, 1)"),
    (["--target", "macs=0.5", "--backend", "ort-cpu"], "--backend and --batch say where a latency target is measured"),
    (["--batch", "8"], "give one with --target latency=F"),
    (["--target", "latency=0.5", "--backend", "warp-drive"], "--backend warp-drive: unknown; known: "),
    (["--resume", "somewhere", "--weights", "w.pt"], "drop --config, --set and --out (and --weights, --force"),
])
def test_bad_budget_and_start_options_are_one_error_line(args, words, tmp_path):
    error = _one_error_line(_invoke("compress", "-c", "digits-lenet-filter", *args, *([] if "--resume" in args else ["--out", str(tmp_path / "r")])))
    assert words in error, error


def test_target_backend_and_batch_become_the_configs_budget(tmp_path):
    """The run fails on its missing data right after writing its config: the options are in it."""
    out = tmp_path / "r"
    result = _invoke("compress", "-c", "digits-lenet-filter", "--target", "latency=0.4", "--backend", "ort-cpu", "--batch", "8",
                     "--set", "data.name=cifar10", "--set", f"data.root={tmp_path / 'nothing'}", "--out", str(out))
    _one_error_line(result)
    target = load_config(str(out / "config.yaml")).pruning.target
    assert (target.metric, target.fraction, target.backend, target.batch) == ("latency", 0.4, "ort-cpu", 8)
    result = _invoke("compress", "-c", str(out / "config.yaml"), "--target", "params=0.25", "--out", str(tmp_path / "again"))
    _one_error_line(result)  # the flag replaces the config's target metric, keeping where latency would be measured
    target = load_config(str(tmp_path / "again" / "config.yaml")).pruning.target
    assert (target.metric, target.fraction, target.latency, target.backend) == ("params", 0.25, None, "ort-cpu")
