"""Robust accuracy in the bench: the judge (rapc.judge) at the bench's two levels, and the same
adversarial images replayed on every exported artifact.

    quick  the judge's final protocol: clean, FGSM, PGD (the run's attack.eval steps, step
           2.5*eps/steps unless its config sets one, at least 2 restarts) and the ensemble
           APGD-CE + APGD-T at the reference settings, worst case per image with PGD
    full   also FAB-T and Square: the standard AutoAttack

Attacks run on the PyTorch model in float32 and eval mode, on pixels in [0, 1]; an image counts
as robust only if the model classifies it correctly clean and under the attack. The judge's
gradient-masking warnings go into the bench report.

Deployed robust accuracy is measured on the exported file itself, on the first n test images:
per image, correct clean, under every replayed PyTorch adversarial image, and under Square run
through the file's runtime (rapc.bench.blackbox). Beside it, the worst case the white-box attacks
left on the PyTorch model on the same images; a file well below its model, a quantized file well
below its fp32 one, and a runtime whose outputs do not respond to its input are warned about.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from rapc.bench.blackbox import square, unresponsive
from rapc.config import AttackConfig
from rapc.errors import RapcError
from rapc.export.runners import Runner
from rapc.judge import SQUARE_QUERIES, Protocol, Verdict, replay_worst_case

LEVELS = {"quick": "final", "full": "full"}  # bench's --attacks -> the judge's level
MODEL_GAP_WARNING = 0.01  # a file's deployed figure this far below its PyTorch model's (same images)
QUANTIZATION_WARNING = 0.02  # an fp16 or int8 file's deployed figure this far below its fp32 file's (same runtime and images)


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


def replay_per_image(runner: Runner, verdict: Verdict, labels: torch.Tensor, batch: int = 256) -> dict[str, np.ndarray]:
    """:func:`replay` per image and attack (correct clean and on the attack's image)."""
    return verdict.replay_correct(runner.infer, labels, batch)


def figure(correct: np.ndarray | torch.Tensor, label: str) -> dict[str, Any]:
    """A robust-accuracy figure as bench.json holds it: label, n, accuracy and its standard error."""
    n = len(correct)
    p = float(np.asarray(correct, dtype=float).mean()) if n else 0.0
    return {"label": label, "n": n, "accuracy": p, "stderr": math.sqrt(p * (1 - p) / n) if n else 0.0}


def deployed(runner: Runner, artifact: str, precision: str, verdict: Verdict, replayed: dict[str, np.ndarray],
             images: torch.Tensor, labels: torch.Tensor, protocol: Protocol, n: int | None,
             queries: int = SQUARE_QUERIES) -> dict[str, Any]:
    """Deployed robust accuracy of one file on one runtime, on the first ``n`` test images.

    ``replayed``: :func:`replay_per_image` of this runner. ``n`` None: no Square; the worst case is
    the replay's, on every image the verdict's attacks all saw. ``n`` is capped at that many, so
    that the PyTorch figure beside it is on the same images. Every figure comes with its label,
    n and standard error.
    """
    shortest = min(r.n for r in verdict.results)
    m = shortest if n is None else min(n, shortest)
    replay = replay_worst_case(replayed, m)
    entry: dict[str, Any] = {
        "n": m,
        "clean": figure(replayed["clean"][:m], "clean"),
        "replay": figure(replay, "worst case per image over the PyTorch adversarial images replayed"),
        "pytorch": figure(verdict.worst_case_per_image(m), "PyTorch fp32, " + verdict.worst_case_label().removesuffix(f", n={shortest}")),
        "square": None,
    }
    worst = replay
    if n is not None:
        result = square(runner, images[:m], labels[:m], protocol.eps, artifact=artifact, precision=precision, queries=queries,
                        seed=protocol.seed, batch=protocol.batch)
        survived = result.correct.numpy()
        worst = replay & survived
        entry["square"] = figure(survived, result.label) | {
            "seconds": result.seconds, "queries": result.details["queries"], "broken": result.details["square"],
            "unresponsive": unresponsive(runner, images[:m], result.correct, protocol.eps, protocol.seed)}
    what = f"replay and Square-{queries}" if entry["square"] else "replay (Square not run)"
    entry["deployed"] = figure(worst, f"worst case per image of {what}")
    return entry


def deployed_warnings(entries: dict[str, dict[str, Any]]) -> list[str]:
    """Warnings over every file's deployed figures (:func:`deployed`, each with ``artifact``, ``model``,
    ``precision`` and ``backend`` added): a file below its PyTorch model, a quantized file below
    its fp32 file on the same runtime, a runtime whose outputs do not respond to its input."""
    warnings = []
    fp32 = {(e["model"], e["backend"]): e for e in entries.values() if "deployed" in e and e["precision"] == "fp32"}
    for key, e in entries.items():
        if "deployed" not in e:
            continue
        d, n = e["deployed"], e["n"]
        gap = e["pytorch"]["accuracy"] - d["accuracy"]
        if gap > MODEL_GAP_WARNING:
            warnings.append(f"{key} ({e['backend']}): deployed robust accuracy {d['accuracy']:.1%} ({d['label']}, n={n}) is "
                            f"{gap * 100:.1f} points below the {e['pytorch']['accuracy']:.1%} the white-box attacks left on the "
                            f"PyTorch model on the same images (more than {MODEL_GAP_WARNING * 100:.0f}): the file is less robust "
                            "than the model it came from, or the white-box attacks were misled on PyTorch (gradient masking)")
        base = fp32.get((e["model"], e["backend"]))
        if e["precision"] != "fp32" and base is not None and base["n"] == n:
            cost = base["deployed"]["accuracy"] - d["accuracy"]
            if cost > QUANTIZATION_WARNING:
                warnings.append(f"{key} ({e['backend']}): {e['precision']} costs {cost * 100:.1f} points of deployed robust "
                                f"accuracy against the fp32 file ({d['accuracy']:.1%} vs {base['deployed']['accuracy']:.1%}, "
                                f"n={n}; more than {QUANTIZATION_WARNING * 100:.0f})")
        if e["square"] and e["square"]["unresponsive"]:
            k, survived = e["square"]["unresponsive"], round(e["square"]["accuracy"] * n)
            warnings.append(f"{key} ({e['backend']}): {k} of the {survived} images that survived {e['square']['label']} get "
                            "bit-identical logits when every pixel moves by eps: the runtime's outputs do not respond to its "
                            "input (constant or saturated), so surviving a black-box attack is no evidence of robustness there")
    return warnings
