"""`torchrun -m rapc compress` with DDP on CPU (gloo): two processes must train the model that one
process trains on the same global batches, and write one run directory."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rapc.config import load_config
from rapc.data import load_data

# val_fraction 0.109 leaves 1,280 training digits: 20 full batches of 64, split evenly between two
# ranks, so DistributedSampler pads nothing and the global batches of both runs hold the same images.
# Clean training: the two runs' weights differ by float rounding (DDP averages two half-batch means),
# and a PGD training step takes the sign of each pixel's gradient, which flips where that gradient is
# near zero: one flipped pixel moves an adversarial example by a whole step, and the runs then part by
# 1e-2 in a weight (seen in the dense control's ADMM stage, at step 12). Adversarial training under
# torchrun is checked against a run of the same world size in test_resume.py.
# One pretraining epoch, then the ADMM and retraining stages; no random starts in the judge's PGD.
SETTINGS = [
    "data.val_fraction=0.109", "attack.train.method=none", "stages.pretrain.epochs=2", "stages.pretrain.clean_epochs=0",
    "stages.admm.epochs=2", "stages.retrain.epochs=1", "eval.n_test=100", "eval.n_ensemble=20", "attack.eval.steps=3", "attack.eval.random_start=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores: one thread each


def _torchrun(processes: int, batch: int, out: Path) -> subprocess.CompletedProcess:
    settings = [*SETTINGS, f"data.batch_size={batch}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
               "-m", "rapc", "compress", "-c", "digits-lenet-filter", *[a for s in settings for a in ("--set", s)], "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """The same training twice: one rank with batch 64, two ranks with batch 32 each."""
    root = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    one = _torchrun(1, 64, root / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, 32, root / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    print(f"two torchrun runs: {time.perf_counter() - start:.1f}s")
    return root / "one", root / "two"


def test_the_data_split_gives_full_equal_batches():
    splits = load_data(load_config("digits-lenet-filter", ["data.val_fraction=0.109"]).data, seed=0)
    assert len(splits.train) % 64 == 0


def test_two_ranks_write_one_run_directory_with_each_epoch_logged_once(runs):
    one, two = runs
    assert sorted(p.relative_to(two) for p in two.rglob("*")) == sorted(p.relative_to(one) for p in one.rglob("*"))
    assert not list(two.rglob(".*.tmp")) and not list(Path.cwd().glob("runs/digits-lenet-filter"))
    assert [(m["stage"], m.get("epoch")) for m in _metrics(two)] == [(m["stage"], m.get("epoch")) for m in _metrics(one)]


def test_two_ranks_end_with_the_masks_weights_and_metrics_of_one_rank_on_the_same_global_batches(runs):
    """Equal up to float rounding: DDP averages two half-batch mean gradients where one process takes
    the mean over the whole batch, which rounds differently in the last bits."""
    one, two = runs
    ours, theirs = (torch.load(r / "checkpoints" / "retrain.pt", weights_only=True)["extra"] for r in (two, one))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)  # the final masks
    for model in ("pretrained", "dense", "compressed"):
        a, b = load_file(two / model / "weights.safetensors"), load_file(one / model / "weights.safetensors")
        assert a.keys() == b.keys() and all(not k.startswith("module.") for k in a)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=f"{model}/{name}")
    for m2, m1 in zip(_metrics(two), _metrics(one), strict=True):
        for key in ("loss", "train_acc", "val_clean", "val_robust", "sparsity"):
            if key in m1:  # global figures: the loss and accuracy sums of both ranks, counted once
                assert m2[key] == pytest.approx(m1[key], abs=2e-3), (m1["stage"], key)
    s2, s1 = (json.loads((r / "summary.json").read_text()) for r in (two, one))
    for key in ("clean", "robust", "params", "macs"):
        assert s2["compressed"][key] == pytest.approx(s1["compressed"][key], abs=1e-2), key


def _check_on_rank(rank: int, store: str, diverge: bool, results) -> None:
    import torch.distributed as dist

    from rapc.pipeline.distributed import Ranks

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        z = torch.arange(6.0).reshape(2, 3)
        if diverge and rank == 1:
            z[1, 2] += 1e-6
        Ranks(rank, 2, rank, enabled=True).assert_same({"z.conv1.weight": z, "u.conv1.weight": torch.zeros(3)}, "ADMM's Z and U")
        results.put((rank, "same"))
    except RuntimeError as exc:
        results.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("diverge", [False, True])
def test_the_admm_check_raises_on_every_rank_when_one_ranks_z_differs(tmp_path, diverge):
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_check_on_rank, args=(rank, str(tmp_path / "store"), diverge, results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    outcome = dict(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    if diverge:
        assert all("ADMM's Z and U differ between ranks" in outcome[rank] for rank in (0, 1)), outcome
    else:
        assert outcome == {0: "same", 1: "same"}

