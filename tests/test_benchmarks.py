"""The speed benchmark runs end to end in a tiny mode and reports every figure it promises."""

import json
import subprocess
import sys
from pathlib import Path

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
    assert "Adversarial training" in done.stdout and "Dense vs shrunk inference" in done.stdout
    figures = json.loads(out.read_text())

    (training,) = figures["training"]
    (row,) = training["rows"]
    assert row["key"] == "admm-pgd" and row["variant"] == "as configured"
    for key in ("mean_ms", "p50_ms", "images_per_s", "epoch_seconds", "epoch_end_ms", "peak_mib", "before_mib"):
        assert row[key] > 0, (key, row)
    assert row["increment_mib"] >= 0 and row["speed_vs_configured"] == 1.0

    (inference,) = figures["inference"]
    timed = {(l["backend"], l["batch"], l["artifact"]) for l in inference["latency"]}
    assert timed == {(b, n, a) for b in ("torch-eager", "ort-cpu") for n in (1, 8) for a in ("dense", "shrunk")}
    assert all(l["mean_ms"] > 0 and l["images_per_s"] > 0 for l in inference["latency"])
    assert len(inference["speedup"]) == 4
    for row in inference["speedup"]:
        assert row["speedup"] > 0 and row["mac_ratio"] > 1 and row["param_ratio"] > 1
