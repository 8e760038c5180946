"""Robust accuracy in the bench: the judge (rapc.judge) at the bench's two levels, and the same
adversarial images replayed on every exported artifact.

    quick  the judge's final protocol: clean, FGSM, PGD (the run's attack.eval steps, step
           2.5*eps/steps unless its config sets one, at least 2 restarts) and the ensemble
           APGD-CE + APGD-T at the reference settings, worst case per image with PGD
    full   also FAB-T and Square: the standard AutoAttack

Attacks run on the PyTorch model in float32 and eval mode, on pixels in [0, 1]; an image counts
as robust only if the model classifies it correctly clean and under the attack. The judge's
gradient-masking warnings go into the bench report.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rapc.config import AttackConfig
from rapc.errors import RapcError
from rapc.export.runners import Runner
from rapc.judge import Protocol, Verdict

LEVELS = {"quick": "final", "full": "full"}  # bench's --attacks -> the judge's level


def bench_protocol(attack: AttackConfig, level: str = "quick", pgd: tuple[int, int] | None = None,
                   n_ensemble: int | None = None, seed: int = 0, batch: int = 256) -> Protocol:
    """The judge for a run's ``attack.eval`` at a bench level.

    ``pgd`` (steps, restarts) replaces the run's PGD, at step 2.5*eps/steps; ``n_ensemble``
    caps the images the ensemble (and at ``full`` FAB-T and Square) attack.
    """
    if level not in LEVELS:
        raise RapcError(f"attacks must be one of {', '.join(LEVELS)}, got {level!r}")
    if attack.method == "none" or attack.eps <= 0:
        raise RapcError(f"the run's attack.eval has no attack (method {attack.method}, eps {attack.eps:g}); "
                        "bench robustness needs a positive eps")
    protocol = Protocol.from_config(attack, level=LEVELS[level], n_ensemble=n_ensemble, seed=seed, batch=batch)
    if pgd is not None:
        protocol = replace(protocol, steps=pgd[0], restarts=pgd[1], step=None, random_start=True)
    return protocol


def replay(runner: Runner, verdict: Verdict, labels: torch.Tensor, batch: int = 256) -> dict[str, float]:
    """Accuracy of an exported artifact on the adversarial images crafted on the PyTorch model
    (per attack, and 'all': the worst case over every attack)."""
    return verdict.replay(runner.infer, labels, batch)
