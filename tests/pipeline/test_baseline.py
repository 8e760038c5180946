"""Which dense model the compressed one is compared with, and that the report says so."""

import json

import torch

from rapc.config import load_config
from rapc.modelio import load_model
from rapc.pipeline.compress import compress


def test_without_the_control_the_baseline_is_the_pretrained_model_and_the_summary_says_it_is_not_budget_matched(tmp_path):
    cfg = load_config("digits-lenet-filter", ["stages.pretrain.epochs=2", "stages.admm.epochs=1", "stages.retrain.epochs=1",
                                              "stages.dense_control=false", "eval.n_ensemble=20"])
    result = compress(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "not budget-matched" in summary["baseline"] and result.baseline == summary["baseline"]
    pretrained, dense = load_model(tmp_path / "run" / "pretrained"), load_model(tmp_path / "run" / "dense")
    assert all(torch.equal(a, b) for a, b in zip(pretrained.state_dict().values(), dense.state_dict().values()))
    metrics = [json.loads(line)["stage"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any(stage.startswith("dense-") for stage in metrics)
    ensemble = next(a for a in summary["compressed"]["judge"]["attacks"] if a["name"] == "ensemble")
    assert ensemble["n"] == 20 and summary["compressed"]["robust"] == ensemble["accuracy"]
