"""The speed benchmark runs end to end in a tiny mode and reports every figure it promises; the
commands its README gives for its figures are still valid commands of it."""

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config", "digits-lenet-filter", "--modes", "admm-pgd", "--limit-batches", "2", "--chunk", "1", "--memory-steps", "1",
    "--backends", "torch-eager,ort-cpu", "--batch-sizes", "1,8", "--warmup", "1", "--min-iters", "2", "--min-seconds", "0",
]


def test_compress_speed_prints_training_time_and_memory_and_latency_per_backend_beside_the_mac_ratio(tmp_path):
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, "benchmarks/compress_speed.py", *TINY, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Adversarial training" in done.stdout and "Dense vs compressed inference" in done.stdout
    figures = json.loads(out.read_text())

    (training,) = figures["training"]
    (row,) = training["rows"]
    assert row["key"] == "admm-pgd" and row["variant"] == "as configured"
    for key in ("mean_ms", "p50_ms", "images_per_s", "epoch_seconds", "epoch_end_ms", "peak_mib", "before_mib"):
        assert row[key] > 0, (key, row)
    assert row["increment_mib"] >= 0 and row["speed_vs_configured"] == 1.0

    (inference,) = figures["inference"]
    timed = {(l["backend"], l["batch"], l["artifact"]) for l in inference["latency"]}
    assert timed == {(b, n, a) for b in ("torch-eager", "ort-cpu") for n in (1, 8) for a in ("dense", "compressed")}
    assert all(l["mean_ms"] > 0 and l["images_per_s"] > 0 for l in inference["latency"])
    assert len(inference["speedup"]) == 4
    for row in inference["speedup"]:
        assert row["speedup"] > 0 and row["mac_ratio"] > 1 and row["param_ratio"] > 1


def _readme_commands() -> list[list[str]]:
    """Every compress_speed.py command in benchmarks/README.md, as its arguments (continuation lines joined)."""
    text = (ROOT / "benchmarks" / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(m) for m in re.findall(r"benchmarks/compress_speed\.py([^\n`]*)", text) if "--help" not in m]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compress_speed", ROOT / "benchmarks" / "compress_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compress_speed"] = module  # its dataclasses look their module up while being made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["compress_speed"]


@pytest.mark.parametrize("argv", _readme_commands(), ids=" ".join)
def test_every_command_in_the_benchmark_readme_is_a_valid_command_of_the_script(script, argv):
    script.parse_args(argv)  # argparse exits on an unknown or malformed option


def test_the_outside_audit_finds_what_rapc_reports_within_two_points(digits_run):
    """The audit attacks with torchattacks directly; rapc's ensemble must not claim more robustness."""
    done = subprocess.run([sys.executable, "benchmarks/audit_robustness.py", str(digits_run), "--n", "360"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in done.stdout.splitlines():
        record = json.loads(line)
        audit, reported = record["audit"], record["rapc reports"]
        assert reported["n"] == record["n"] == 360
        assert reported["accuracy"] <= audit["worst case"] + 0.02, record
        assert audit["worst case"] < audit["clean"]  # the attacks really lower accuracy


def test_time_to_robustness_tables_and_plots_every_recipe_and_a_rerun_reuses_the_finished_points(tmp_path):
    """Two recipes at one budget on digits: the table, the plot and each point's point.json; run again,
    nothing is trained and the same table comes back."""
    command = [sys.executable, "benchmarks/time_to_robustness.py", "--config", "digits-lenet-filter", "--recipes", "preset,fgsm-rs",
               "--multipliers", "1", "--n", "40", "--threads", "1", "--min-clean", "0", "--min-mac-ratio", "3", "--out", str(tmp_path),
               *(f"--set={o}" for o in ("stages.pretrain.epochs=2", "stages.pretrain.clean_epochs=1", "stages.admm.epochs=1",
                                        "stages.retrain.epochs=1", "eval.n_val=100"))]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "pretrain 1/2" in first.stderr
    table = (tmp_path / "table.md").read_text()
    assert table in first.stdout
    for recipe in ("preset", "fgsm-rs"):
        assert f"| {recipe} | x1 | 2+1+1 |" in table
    assert "dense_control=false" in table and "\npick: " in table and "pick: none" not in table
    assert (tmp_path / "time_to_robustness.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    points = {r: json.loads((tmp_path / f"{r}-x1" / "point.json").read_text()) for r in ("preset", "fgsm-rs")}
    for recipe, point in points.items():
        assert point["recipe"] == recipe and point["epochs"] == "2+1+1" and point["seconds"] > 0 and point["mac_ratio"] > 3
        assert point["config"]["stages"]["dense_control"] is False
        logged = [json.loads(line) for line in (tmp_path / f"{recipe}-x1" / "metrics.jsonl").read_text().splitlines()]
        assert point["seconds"] == pytest.approx(sum(r["seconds"] for r in logged if "epoch" in r))  # every epoch, not the judge
        for attack in ("clean", "pgd", "ensemble"):
            assert point[attack]["n"] == 40 and 0 <= point[attack]["accuracy"] <= 1 and point[attack]["stderr"] >= 0
        assert point["ensemble"]["label"].startswith("ensemble PGD-10x2") and point["ensemble"]["accuracy"] <= point["pgd"]["accuracy"]
    assert points["fgsm-rs"]["config"]["attack"]["train"]["method"] == "fgsm" and points["fgsm-rs"]["overrides"][0] == "attack.train.method=fgsm"

    written = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*") if p.is_file()}
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("finished before") == 2 and "pretrain 1/2" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert (tmp_path / "table.md").read_text() == table
