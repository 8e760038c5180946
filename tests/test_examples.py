"""The worked "Compress your own model" example (docs/configuration.md, examples/own_model/), run end to end at a tiny size
so that it cannot rot: the user's scripts make an image folder and train their own network outside
rapc, then its commands compress, export and bench it with the example's config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rapc.modelio import load_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model"
RAPC = shutil.which("rapc") or str(Path(sys.executable).with_name("rapc"))
# Small enough for seconds on one core: 500 training and 100 test images, small_cnn at half width trained
# for 6 epochs at eps 0.1 (robust enough to pass the start check), one epoch per rapc stage, the judge's
# ensemble on 10 images.
TRAIN = ("--epochs", "6", "--channels", "8", "--eps", "0.1")
TINY = ("--set", "model.kwargs.channels=8", "--set", "attack.train.eps=0.1", "--set", "attack.eval.eps=0.1",
        "--set", "stages.admm.epochs=1", "--set", "stages.retrain.epochs=1", "--set", "eval.n_start=20",
        "--set", "eval.n_ensemble=10", "--set", "pruning.sensitivity.n_images=32")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "200"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def mynets_importable(monkeypatch):
    """The example's module importable here too, for reading the run back in this process."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    sys.modules.pop("mynets", None)


def test_the_own_model_example_goes_from_an_image_folder_to_a_benched_compressed_model(tmp_path, mynets_importable):
    data = "runs/own-model-data"  # where config.yaml's data.root points, from the working directory
    _run(sys.executable, str(EXAMPLE / "make_folder.py"), data, "--train-per-class", "50", "--test-per-class", "10", cwd=tmp_path)
    assert len(list((tmp_path / data / "test").glob("*/*.png"))) == 100
    trained = _run(sys.executable, str(EXAMPLE / "train.py"), data, "--out", f"{data}/robust.pt", *TRAIN, cwd=tmp_path)
    assert "epoch 6/6 (FGSM-RS" in trained.stdout
    saved = torch.load(tmp_path / data / "robust.pt", weights_only=True)
    assert all(key.startswith("module.") for key in saved)  # saved as DataParallel does; rapc strips the prefix

    compressed = _run(RAPC, "compress", "-c", str(EXAMPLE / "config.yaml"), "--weights", f"{data}/robust.pt", "--target", "macs=0.5",
                      "--out", "runs/own-model", *TINY, cwd=tmp_path)
    assert "start model: clean" in compressed.stderr
    assert "budget: " in compressed.stdout and "of the dense model's macs kept (target 0.500; sensitivity allocation" in compressed.stdout
    run = tmp_path / "runs" / "own-model"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compressed"]["macs"] < summary["dense"]["macs"]
    assert summary["baseline"].startswith(f"the given weights ({data}/robust.pt)")
    pretrained = load_model(run / "pretrained", allow_import=True)
    mynets = __import__("mynets")  # config.yaml's model.normalize puts train.py's input statistics in front of the network
    assert torch.allclose(pretrained.normalize.mean.flatten(), torch.tensor(mynets.MEAN))
    assert torch.allclose(pretrained.normalize.std.flatten(), torch.tensor(mynets.STD))
    given = {k.removeprefix("module."): v for k, v in saved.items()}
    assert all(torch.equal(v, given[k]) for k, v in pretrained.net.state_dict().items() if k in given)
    assert {"allocation.md", "sensitivity.png"} <= {p.name for p in (run / "allocation").iterdir()}

    exported = _run(RAPC, "export", "runs/own-model", "--dense", "--n-check", "16", cwd=tmp_path)
    assert "compressed.onnx" in exported.stdout and "dense.onnx" in exported.stdout
    _run(RAPC, "bench", "runs/own-model", "--backends", "torch-eager,ort-cpu", "--batch-sizes", "1", "--n-eval", "20",
         "--n-ensemble", "5", "--min-seconds", "0.05", cwd=tmp_path)
    assert (run / "bench" / "report.md").is_file()
