"""One study row across seeds: each seed's figures, and their mean and standard deviation.

A seed changes the dense init, the validation split and the order of the batches; the spread
of a figure across seeds (sample standard deviation) is what tells two rows apart. The
standard error of one seed's figure (binomial, over the test images) is only the part of that
spread which comes from the finite test split, and is kept beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean, stdev
from typing import Any

from rapc.results import AttackFigure, JudgeResult

# What every seed of a row shares (the size is the first seed's model, the one timed; filter and
# channel pruning at a ratio give every seed the same shapes)
SHARED = ("key", "ratio", "scheme", "row", "epochs", "recipe", "schedule", "full_eps_epochs", "params", "macs", "sparsity")


def seed_dir(seed: int) -> str:
    """The directory, under the study's, of everything trained with ``seed``."""
    return f"seed{seed}"


def _spread(figures: Sequence[AttackFigure]) -> dict[str, Any]:
    """One attack's figure of every seed as mean, standard deviation (None for one seed) and each seed's."""
    first = figures[0]
    accuracies = [f.accuracy for f in figures]
    return {"name": first.name, "label": first.label, "n": first.n, "mean": fmean(accuracies),
            "std": stdev(accuracies) if len(accuracies) > 1 else None,
            "stderr": fmean(f.stderr for f in figures), "per_seed": accuracies}


def combine(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The study's line for one row from its result with each seed (``rows``, in seed order, each judged
    with the study's protocol): the judge's figures as mean and spread, each seed's result under ``seeds``."""
    first, judges = rows[0], [JudgeResult.from_json(row["judge"]) for row in rows]
    figures = [_spread([judge[attack.name] for judge in judges]) for attack in judges[0].attacks]
    robust = judges[0].robust.name
    several = len(rows) > 1
    return {
        **{key: first[key] for key in SHARED if key in first},
        "n_seeds": len(rows),
        "figures": figures,
        "robust": next(f for f in figures if f["name"] == robust),
        "train_seconds": fmean(row["train_seconds"] for row in rows),
        "warnings": [f"seed {row['seed']}: {w}" if several else w for row, judge in zip(rows, judges) for w in judge.warnings],
        "seeds": list(rows),
    }
