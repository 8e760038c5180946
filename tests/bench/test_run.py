import json
import shutil

import matplotlib.image
import pytest
from click.testing import CliRunner

from rapc.bench.latency import TimingPolicy
from rapc.bench.run import BenchOptions, bench_run
from rapc.cli import main
from rapc.errors import RapcError
from rapc.export.artifacts import export_run

QUICK = TimingPolicy(warmup=2, min_iters=10, min_seconds=0.05)
SQUARE_QUERIES = 200  # the default is the reference 5000; a few hundred keep the module's bench under a minute


@pytest.fixture(scope="module")
def benched(digits_run, tmp_path_factory):
    run = shutil.copytree(digits_run, tmp_path_factory.mktemp("bench") / "run")
    export_run(run, dense=True, precisions=("fp32", "int8"), n_check=50, n_calibration=64)
    options = BenchOptions(backends=("torch-eager", "ort-cpu", "tensorrt"), batch_sizes=(1, 8), n_eval=360, n_ensemble=200,
                           n_square=60, square_queries=SQUARE_QUERIES, timing=QUICK)
    return run, bench_run(run, options)


def test_onnxruntime_replay_matches_pytorch_robust_accuracy_within_half_a_point(benched):
    _, report = benched
    for onnx, model in (("compressed.onnx", "compressed"), ("dense.onnx", "dense")):
        replayed = report["replay"][onnx]["accuracy"]
        on_torch = {a["name"]: a["accuracy"] for a in report["robustness"][model]["attacks"]}
        assert set(replayed) == set(on_torch) | {"all"}
        for attack, accuracy in on_torch.items():
            assert abs(replayed[attack] - accuracy) <= 0.005, (onnx, attack)
        assert abs(replayed["all"] - report["robustness"][model]["worst_case"]) <= 0.005
    assert report["robustness"]["compressed"]["worst_case"] < report["robustness"]["compressed"]["attacks"][0]["accuracy"]
    int8 = report["replay"]["compressed.int8.onnx"]
    assert int8["precision"] == "int8" and 0 < int8["accuracy"]["all"] <= int8["accuracy"]["clean"]


def test_the_quick_level_judges_with_the_ensemble_and_labels_every_figure(benched):
    run, report = benched
    dense = report["robustness"]["dense"]
    labels = {a["name"]: a["label"] for a in dense["attacks"]}
    assert labels == {"clean": "clean", "fgsm": "FGSM step 0.1", "pgd": "PGD-10x2 step 0.025",
                      "ensemble": "ensemble PGD-10x2 step 0.025 + APGD-CE + APGD-T (100 steps, 9 targets)"}
    assert {a["name"]: a["n"] for a in dense["attacks"]} == {"clean": 360, "fgsm": 360, "pgd": 360, "ensemble": 200}
    assert all("stderr" in a for a in dense["attacks"]) and dense["robust"]["label"] == labels["ensemble"]
    assert report["judge"]["level"] == "final" and report["judge"]["n_ensemble"] == 200
    assert all(l["robust_attack"] == report["worst_case_label"] for l in report["latency"])
    assert "ensemble PGD-10x2" in report["worst_case_label"] and report["worst_case_label"] == "worst case per image over FGSM step 0.1 and " + labels["ensemble"] + ", n=200"
    md = (run / "bench" / "report.md").read_text()
    accuracy = md.split("## Accuracy on PyTorch")[1].split("##")[0]
    for name, label in labels.items():
        n = 200 if name == "ensemble" else 360
        assert f"| {name} | {n} |" in accuracy and (name == "clean" or f"{name}: {label}" in accuracy)
    assert " ± " in accuracy
    replayed = md.split("## The PyTorch adversarial images replayed")[1].split("##")[0]
    assert "| artifact | runs on | clean | fgsm | pgd | ensemble | all |" in replayed
    assert "pgd: PGD-10x2 step 0.025, n=360" in replayed and "(100 steps, 9 targets), n=200" in replayed
    assert "PGD acc" not in md


def test_masking_warnings_reach_the_report(benched, tmp_path, monkeypatch):
    """An honest model's bench has none; a flagged verdict's warnings appear in the JSON and the Markdown."""
    run, report = benched
    assert report["warnings"] == [] or all("latency" in w for w in report["warnings"])
    from rapc import judge as judge_module

    flagged = "PGD-10x2 step 0.025 says 90.0% but the ensemble 60.0%: a gap of 30 points"
    monkeypatch.setattr(judge_module, "masking_warnings", lambda results, zero: [flagged])
    again = bench_run(run, BenchOptions(backends=("torch-eager",), batch_sizes=(1,), n_eval=40, n_ensemble=10, n_square=None,
                                        timing=QUICK), out=tmp_path)
    assert f"dense: {flagged}" in again["warnings"] and again["robustness"]["compressed"]["warnings"] == [flagged]
    assert f"- compressed: {flagged}" in (tmp_path / "report.md").read_text()


def test_every_exported_file_gets_deployed_robust_accuracy_with_labels_n_and_standard_errors(benched):
    _, report = benched
    deployed = report["deployed"]
    assert set(deployed) == {"dense.onnx", "dense.int8.onnx", "compressed.onnx", "compressed.int8.onnx"}
    for key, e in deployed.items():
        assert e["backend"] == "ort-cpu" and e["runtime"] == "onnxruntime CPU" and e["n"] == 60
        assert e["square"]["label"] == f"Square-200 on {key} (onnxruntime CPU, {e['precision']})" and e["square"]["n"] == 60
        assert e["deployed"]["label"] == "worst case per image of replay and Square-200"
        assert e["deployed"]["accuracy"] <= min(e["replay"]["accuracy"], e["square"]["accuracy"]) <= e["clean"]["accuracy"]
        p = e["deployed"]["accuracy"]
        assert e["deployed"]["stderr"] == pytest.approx((p * (1 - p) / 60) ** 0.5)
        assert e["square"]["unresponsive"] == 0 and e["square"]["seconds"] > 0
    for model in ("dense", "compressed"):  # the fp32 file replays its model's images exactly: the PyTorch figure is its replay's
        fp32 = deployed[f"{model}.onnx"]
        assert fp32["pytorch"]["accuracy"] == pytest.approx(fp32["replay"]["accuracy"], abs=1 / 60)
        assert fp32["pytorch"]["label"].startswith("PyTorch fp32, worst case per image over FGSM step 0.1 and ensemble")
    # Square broke images that survived the replay somewhere, or the deployed column would just repeat it
    assert any(e["deployed"]["accuracy"] < e["replay"]["accuracy"] for e in deployed.values())
    ort = [l for l in report["latency"] if l["backend"] == "ort-cpu"]
    assert ort and all(l["deployed"] == deployed[f"{l['artifact']}.onnx"]["deployed"] for l in ort)
    eager = [l for l in report["latency"] if l["backend"] == "torch-eager"]
    assert all(l["deployed"] == deployed[f"{l['artifact']}.onnx"]["pytorch"] for l in eager)


def _in_80_columns(table) -> str:
    """The table as an 80-column terminal shows it, checked to fit with every row whole."""
    from rich.console import Console

    console = Console(width=80, record=True)
    console.print(table.rich())
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for row in table.rows:  # nothing cut short: every row's figures appear whole
        assert any(all(cell in line for cell in row) for line in text.splitlines()), row
    assert "…" not in text  # no header cut short either
    return " ".join(text.split())


def test_the_deployed_and_replay_tables_fit_80_columns_with_a_legend_and_are_in_the_report(benched):
    from rapc.bench.report import tables

    run, report = benched
    (table,) = [t for t in tables(report) if t.title.startswith("Deployed robust accuracy")]
    assert "Square: Square-200 through the runtime" in _in_80_columns(table)
    (replayed,) = [t for t in tables(report) if t.title.startswith("The PyTorch adversarial images replayed")]
    legend = _in_80_columns(replayed)
    for attack in report["robustness"]["dense"]["attacks"][1:]:  # each short column named with its attack's label and n
        assert f"{attack['name']}: {attack['label']}, n={attack['n']}" in legend
    md = (run / "bench" / "report.md").read_text()
    section = md.split("## Deployed robust accuracy")[1].split("\n## ")[0]
    assert "| artifact | runs on | clean | replay | Square | deployed | PyTorch |" in section
    assert "| compressed.int8 | ort-cpu |" in section and "n=60: the first test images, L-inf eps 0.1" in section
    assert "deployed: worst case per image of replay and Square, ± standard error" in section


def test_latency_covers_every_runnable_backend_artifact_and_batch_and_lists_the_rest(benched):
    _, report = benched
    timed = {(l["backend"], l["artifact"], l["batch"]) for l in report["latency"]}
    for batch in (1, 8):
        assert {("torch-eager", "dense", batch), ("torch-eager", "compressed", batch), ("ort-cpu", "dense", batch),
                ("ort-cpu", "compressed", batch), ("ort-cpu", "compressed.int8", batch)} <= timed
    assert report["skipped"]["torch-eager:compressed.int8"] == "an ONNX-only precision variant (no PyTorch model)"
    assert report["skipped"]["tensorrt:compressed"].startswith("no TensorRT engine")
    eager = {l["artifact"]: l for l in report["latency"] if l["backend"] == "torch-eager" and l["batch"] == 8}
    assert eager["dense"]["robust_accuracy"] == report["robustness"]["dense"]["worst_case"]
    speedup = next(s for s in report["speedup"] if (s["backend"], s["batch"], s["artifact"]) == ("torch-eager", 8, "compressed"))
    assert speedup["speedup"] == pytest.approx(eager["dense"]["mean_ms"] / eager["compressed"]["mean_ms"])
    assert speedup["mac_ratio"] > 1.5 and speedup["param_ratio"] > 1.5


def test_report_files_are_written_and_the_plots_open(benched):
    run, report = benched
    out = run / "bench"
    assert json.loads((out / "bench.json").read_text())["replay"] == report["replay"]
    md = (out / "report.md").read_text()
    for heading in ("## Accuracy on PyTorch", "## The PyTorch adversarial images replayed", "## Speedup over the dense model",
                    "## Latency", "## Per layer", "## Skipped backends", "| compressed.int8.onnx | ort-cpu |"):
        assert heading in md
    for name in ("robust_vs_latency.png", "layers.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 0
    assert report["machine"]["versions"]["torch"] and report["machine"]["torch_threads"] >= 1
    conv = [l for l in report["layers"] if l["name"].startswith("conv")]
    assert all(l["shape_after"][0] < l["shape_before"][0] for l in conv)


def test_bench_command_prints_tables_and_writes_the_report(benched, tmp_path):
    run, _ = benched
    result = CliRunner().invoke(main, ["bench", str(run), "--backends", "torch-eager", "--batch-sizes", "1",
                                       "--n-eval", "40", "--n-ensemble", "20", "--square-queries", "100", "--min-seconds", "0.05",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Accuracy on PyTorch" in result.output and "Speedup over the dense model" in result.output
    assert "Deployed robust accuracy" in result.output and "Square-100 through the runtime" in " ".join(result.output.split())
    skipped = CliRunner().invoke(main, ["bench", str(run), "--backends", "torch-eager", "--batch-sizes", "1", "--n-eval", "40",
                                        "--n-ensemble", "20", "--no-square", "--min-seconds", "0.05", "--out", str(tmp_path / "b")])
    assert skipped.exit_code == 0 and "Square: not run (--no-square)" in " ".join(skipped.output.split())
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["deployed"]["compressed.onnx"]["square"] is None
    assert "PGD-10x2 step 0.025" in result.output and "ensemble" in result.output
    assert (tmp_path / "report.md").is_file()


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "0"], "batch sizes must be at least 1, got 0"),
    (["--batch-sizes", "1,x"], "expected comma-separated integers"),
    (["--backends", "tensorflow"], "unknown bench backend 'tensorflow'"),
    (["--pgd", "50"], "expected STEPSxRESTARTS"),
])
def test_bad_bench_options_are_one_line_errors(benched, args, message):
    run, _ = benched
    result = CliRunner().invoke(main, ["bench", str(run), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_run_without_models_is_a_user_error(tmp_path, digits_run):
    shutil.copy(digits_run / "config.yaml", tmp_path / "config.yaml")
    with pytest.raises(RapcError, match="holds no saved model"):
        bench_run(tmp_path, BenchOptions(backends=("torch-eager",)))


def test_attack_results_are_cached_per_plan_and_weights_and_reused(benched, tmp_path, monkeypatch):
    run, report = benched
    assert (run / "bench" / "attacks" / "compressed.safetensors").is_file()
    with monkeypatch.context() as patched:
        patched.setattr("rapc.bench.run.judge", lambda *a, **k: pytest.fail("attacked again"))
        again = bench_run(run, BenchOptions(backends=("torch-eager",), batch_sizes=(1,), n_eval=360, n_ensemble=200, n_square=None,
                                            timing=QUICK), out=run / "bench")
    assert again["robustness"] == report["robustness"]
    fewer = bench_run(run, BenchOptions(backends=("torch-eager",), batch_sizes=(1,), n_eval=100, n_ensemble=200, n_square=None,
                                        timing=QUICK), out=tmp_path)
    assert fewer["n_eval"] == 100 and all(a["n"] == 100 for a in fewer["robustness"]["dense"]["attacks"])
