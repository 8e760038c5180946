"""An outside audit of a run's robust accuracy: the attacks written here from torchattacks
directly, not through rapc's judge, on the same test images, to check that the figure rapc
reports is not higher than what independent attacks find (issue 11: within 2 points).

    python benchmarks/audit_robustness.py runs/mnist-lenet-filter --n 1000
    python benchmarks/audit_robustness.py runs/study-mnist-lenet-filter/seed0/r4-filter/scratch   # a study row

Per image, robust means still correct after PGD-100 with 2 random restarts (step 2.5*eps/100),
APGD-CE and APGD-T (100 steps, 9 target classes): the worst case over all of them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torchattacks

from rapc.config import Config, load_config
from rapc.data import first, load_data
from rapc.modelio import load_model
from rapc.rundir import open_run
from rapc.study.cache import CONFIG_FILE
from rapc.study.rows import final_model
from rapc.study.run import ROW_FILE


def audit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    n_classes = int(model(x[:1]).shape[1])
    apgd_t = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=seed, n_classes=n_classes)
    apgd_t.n_target_classes = min(9, n_classes - 1)  # torchattacks reads the target count from this attribute
    attacks = {
        "pgd-100x2": [torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / 100, steps=100, random_start=True) for _ in range(2)],
        "apgd-ce": [torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=seed, loss="ce")],
        "apgd-t": [apgd_t],
    }
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    figures = {"clean": float(robust.float().mean())}
    for name, parts in attacks.items():
        alone = robust.clone()
        for attack in parts:
            adv = attack(x, y)
            with torch.no_grad():
                alone &= model(adv).argmax(1) == y
        figures[name] = float(alone.float().mean())
        robust &= alone
    figures["worst case"] = float(robust.float().mean())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory, or a study row's (with its row.json)")
    parser.add_argument("--n", type=int, default=1000, help="first N test images")
    parser.add_argument("--models", default=None, help="comma-separated models of the run (default: all)")
    args = parser.parse_args()
    cfg, models, reports = _models(Path(args.run))
    x, y = first(load_data(cfg.data, cfg.seed).test, args.n)
    wanted = args.models.split(",") if args.models else None
    for name, directory in models.items():
        if wanted is not None and name not in wanted:
            continue
        start = time.perf_counter()
        figures = audit(load_model(directory), x, y, cfg.attack.eval.eps, cfg.seed)
        print(json.dumps({"model": name, "n": len(y), "audit": figures, "rapc reports": reports[name],
                          "seconds": round(time.perf_counter() - start, 1)}))


def _models(path: Path) -> tuple[Config, dict[str, Path], dict[str, dict[str, Any]]]:
    """The config, the models and the robust figure rapc reported for each: a run's dense and
    compressed, or a study row's one model (its row.json and the config its directory was claimed with)."""
    if (path / ROW_FILE).is_file():
        row = json.loads((path / ROW_FILE).read_text())
        return load_config(str(path / CONFIG_FILE)), {row["row"]: final_model(path)}, {row["row"]: row["judge"]["robust"]}
    run = open_run(path)
    summary = run.summary() or {}
    return run.config(), run.models(), {name: summary.get(name, {}).get("judge", {}).get("robust", {}) for name in run.models()}


if __name__ == "__main__":
    main()
