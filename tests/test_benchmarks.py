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
        assert f"| {recipe} | x1 | 2+1+1 | 1 |" in table
    assert "dense_control=false" in table and "\npick: " in table and "pick: none" not in table
    assert (tmp_path / "time_to_robustness.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    points = {r: json.loads((tmp_path / f"{r}-x1-s0" / "point.json").read_text()) for r in ("preset", "fgsm-rs")}
    for recipe, point in points.items():
        assert point["recipe"] == recipe and point["epochs"] == "2+1+1" and point["seconds"] > 0 and point["mac_ratio"] > 3
        assert point["config"]["stages"]["dense_control"] is False
        logged = [json.loads(line) for line in (tmp_path / f"{recipe}-x1-s0" / "metrics.jsonl").read_text().splitlines()]
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


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def _point(recipe: str, multiplier: float, seed: int, seconds: float, ensemble: float) -> dict:
    attack = {"label": "ensemble", "n": 300, "accuracy": ensemble, "stderr": 0.03}
    return {"recipe": recipe, "multiplier": multiplier, "seed": seed, "epochs": "5+3+3", "overrides": [], "seconds": seconds,
            "mac_ratio": 3.81, "clean": {**attack, "accuracy": 0.97}, "pgd": attack, "ensemble": attack, "guard_stops": [], "warnings": []}


def test_time_to_robustness_averages_seeds_and_says_how_much_faster_a_recipe_reached_the_preset():
    script = _load_script("time_to_robustness")
    points = [_point("preset", 1, 0, 600, 0.60), _point("preset", 1, 1, 660, 0.56), _point("preset", 1, 2, 630, 0.58),
              _point("carry-1", 1, 0, 200, 0.61), _point("carry-1", 1, 1, 220, 0.57), _point("carry-1", 1, 2, 210, 0.59),
              _point("free-2", 0.5, 0, 100, 0.40), _point("free-2", 0.5, 1, 100, 0.50)]
    rows = {(r["recipe"], r["multiplier"]): r for r in script.aggregate(points)}
    preset = rows[("preset", 1)]
    assert preset["seeds"] == [0, 1, 2] and preset["seconds"] == pytest.approx(630)
    assert preset["ensemble"]["accuracy"] == pytest.approx(0.58) and preset["ensemble"]["spread"] == pytest.approx(0.02)
    assert rows[("free-2", 0.5)]["ensemble"]["spread"] == pytest.approx(0.0707, abs=1e-4)
    assert script.aggregate(points[:1])[0]["ensemble"]["spread"] == 0.03  # one seed: the judge's standard error
    line = script.reach_line(list(rows.values()))
    assert "(58.0% in 630 s)" in line and "carry-1 x1 in 210 s (3.00x fewer seconds)" in line and "free-2 did not" in line


def test_round_to_latency_times_each_round_to_at_one_mac_budget(tmp_path):
    out = tmp_path / "round_to.json"
    done = subprocess.run([sys.executable, "benchmarks/round_to_latency.py", "--round-to", "1,8", "--resnet-width", "0", "--batch-sizes", "1",
                           "--repeats", "1", "--warmup", "1", "--min-iters", "2", "--min-seconds", "0", "--threads", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "random weights" in done.stdout and "round_to=1 / this" in done.stdout
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"][0]["rows"]}
    assert set(rows) == {"dense", "round_to=1", "round_to=8"}
    kept = [int(w.split("/")[0]) for w in rows["round_to=8"]["widths"].split()]
    assert kept and all(k % 8 == 0 for k in kept) and any(int(w.split("/")[0]) % 8 for w in rows["round_to=1"]["widths"].split())
    for name in ("round_to=1", "round_to=8"):  # the same MAC budget, met
        assert rows[name]["budget_met"] and abs(rows[name]["mac_fraction"] / 0.26 - 1) <= 0.02
    assert all(p > 0 for r in rows.values() for p in r["p50_ms"])


def test_ort_batch1_measures_each_variant_against_before_on_both_models(tmp_path):
    out = tmp_path / "ort.json"
    done = subprocess.run([sys.executable, "benchmarks/ort_batch1.py", "--variants", "relu-first,rapc", "--batch-sizes", "1",
                           "--repeats", "2", "--warmup", "1", "--min-iters", "2", "--min-seconds", "0", "--pause", "0", "--threads", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert 3.7 < figures["mac_ratio"] < 3.9  # the default preset's compressed LeNet
    rows = {r["variant"]: r for r in figures["results"]}
    assert set(rows) == {"before", "relu-first", "rapc"} and set(rows["before"]["effect_compressed"]) == {1.0}
    for name in ("relu-first", "rapc"):  # two windows each, every one paired with before's timings of it
        assert len(rows[name]["speedup"]) == len(rows[name]["effect_compressed"]) == 2 and min(rows[name]["speedup"]) > 0
    assert len(rows["before"]["speedup"]) == 4


@pytest.mark.parametrize("script", ["round_to_latency", "ort_batch1"])
def test_every_command_of_the_latency_scripts_in_the_benchmark_readme_is_valid(script):
    module = _load_script(script)
    text = (ROOT / "benchmarks" / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(m) for m in re.findall(rf"benchmarks/{script}\.py([^\n`]*)", text)]
    assert commands, f"benchmarks/README.md gives no {script}.py command"
    for argv in commands:
        module.parse_args(argv)  # argparse exits on an unknown or malformed option
