"""Robust accuracy that a reviewer would accept, and the same adversarial images replayed
on every exported artifact.

Attacks run on the PyTorch model in float32 and eval mode, on pixels in [0, 1], in
nominal order of strength: clean, FGSM, PGD-k (restarts), AutoAttack. An example
counts as robust only if the model classifies it correctly clean and under the attack.

AutoAttack is composed here from torchattacks' parts at the reference ("standard")
settings: APGD-CE 100 steps, APGD-T 100 steps on 9 target classes, FAB-T on 9 target
classes, Square with 5000 queries, each run only on the points the earlier ones left
unbroken, with a fixed seed. torchattacks' own ``AutoAttack`` class runs its parts
with 10 iterations and seeds from the clock, so it is not the standard attack.

Warning signs of gradient masking are reported, never hidden: accuracy that rises
with a stronger attack, input gradients that are exactly zero, and the black-box
Square attack breaking points the white-box attacks could not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rapc.attacks import attack_batch
from rapc.config import AttackConfig
from rapc.errors import RapcError, require
from rapc.export.runners import Runner
from rapc.progress import Reporter, SilentReporter

LEVELS = ("quick", "full")
DEFAULT_PGD = {"quick": (20, 1), "full": (50, 5)}
SQUARE_WARNING = 0.01  # fraction of the AutoAttack points broken only by Square that raises a warning

# One batch in, (adversarial images, still correct) out.
BatchAttack = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AttackPlan:
    """Which attacks to run, at which eps (pixel units), on how many test images."""

    eps: float
    level: str = "quick"  # quick: clean, FGSM, PGD-20x1; full adds PGD-50x5 and AutoAttack
    pgd: tuple[int, int] | None = None  # (steps, restarts) of the strongest PGD; None: the level's default
    n_autoattack: int | None = None  # AutoAttack on the first n evaluation images; None: all of them
    seed: int = 0
    batch: int = 256

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise RapcError(f"attacks must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.eps <= 0:
            raise RapcError(f"attack eps must be positive, got {self.eps:g}")

    def pgd_settings(self) -> list[tuple[int, int]]:
        """PGD-20x1 always; the level's (or the user's) stronger PGD after it, for the monotonicity check."""
        strongest = self.pgd or DEFAULT_PGD[self.level]
        return [(20, 1)] if strongest == (20, 1) else [(20, 1), strongest]


@dataclass
class AttackResult:
    name: str  # clean, fgsm, pgd-20x1, pgd-50x5, autoattack
    description: str
    images: torch.Tensor  # per example: the image that fooled the model, else the attack's last one (CPU)
    correct: torch.Tensor  # bool per example (CPU)
    seconds: float
    details: dict[str, int] = field(default_factory=dict)  # AutoAttack: points broken by each part

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.correct) else 0.0

    def summary(self) -> dict:
        return {"name": self.name, "description": self.description, "n": len(self.correct),
                "accuracy": self.accuracy, "seconds": self.seconds, **({"broken_by": self.details} if self.details else {})}


@dataclass
class Robustness:
    """The attacks on one model, plus the gradient-masking checks."""

    results: list[AttackResult]
    zero_gradients: int  # clean-correct examples whose input gradient is exactly zero
    warnings: list[str]

    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers and strings only, so it loads with ``torch.load(weights_only=True)``."""
        return {"results": [asdict(r) for r in self.results], "zero_gradients": self.zero_gradients, "warnings": self.warnings}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Robustness:
        return cls([AttackResult(**r) for r in state["results"]], state["zero_gradients"], state["warnings"])

    def by_name(self) -> dict[str, AttackResult]:
        return {r.name: r for r in self.results}

    def worst_case(self) -> float:
        """Accuracy when every attack gets its try on every example (on the images all attacks saw)."""
        n = min(len(r.correct) for r in self.results)
        return float(torch.stack([r.correct[:n] for r in self.results]).all(0).float().mean())


def _predict(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(chunk).argmax(1) for chunk in x.split(batch)])


def _project(adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Into the eps-ball and [0, 1], whatever the attack returned."""
    return torch.max(torch.min(adv, x + eps), x - eps).clamp(0, 1)


def _batched(attack: BatchAttack, x: torch.Tensor, y: torch.Tensor, batch: int, reporter: Reporter, title: str) -> tuple[torch.Tensor, torch.Tensor]:
    reporter.begin(title, math.ceil(len(x) / batch))
    images, correct = [], []
    for xb, yb in zip(x.split(batch), y.split(batch)):
        adv, ok = attack(xb, yb)
        images.append(adv)
        correct.append(ok)
        reporter.advance()
    return torch.cat(images), torch.cat(correct)


def _autoattack_parts(model: nn.Module, eps: float, n_classes: int, seed: int) -> Iterator[tuple[str, Callable]]:
    """The standard AutoAttack's four parts at their reference settings."""
    ta = require("torchattacks", "pip install torchattacks")
    targets = min(9, n_classes - 1)
    apgd_t = ta.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=seed, n_classes=n_classes)
    fab_t = ta.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=seed, multi_targeted=True, n_classes=n_classes)
    apgd_t.n_target_classes = fab_t.n_target_classes = targets  # the reference uses 9 targets however many classes
    yield "apgd-ce", ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=seed, loss="ce")
    yield "apgd-t", apgd_t
    yield "fab-t", fab_t
    yield "square", ta.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed)


def autoattack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, n_classes: int, seed: int = 0,
    batch: int = 256, reporter: Reporter | None = None, title: str = "autoattack",
) -> AttackResult:
    """Standard AutoAttack (Croce & Hein, 2020): each part attacks only what the earlier ones left standing."""
    reporter = reporter or SilentReporter()
    start = time.perf_counter()
    images = x.clone()
    correct = _predict(model, x, batch) == y
    broken: dict[str, int] = {}
    for name, part in _autoattack_parts(model, eps, n_classes, seed):
        alive = correct.nonzero().squeeze(1)
        reporter.begin(f"{title} {name}", math.ceil(len(alive) / batch))
        for chunk in alive.split(batch):
            adv = _project(part(x[chunk], y[chunk]).detach(), x[chunk], eps)
            images[chunk] = adv
            correct[chunk] = _predict(model, adv, batch) == y[chunk]
            reporter.advance()
        broken[name] = len(alive) - int(correct.sum())
        reporter.end(f"{title} {name}: broke {broken[name]} of {len(alive)}")
    model.eval()
    return AttackResult("autoattack", "AutoAttack standard (APGD-CE, APGD-T 9 targets, FAB-T 9 targets, Square 5000; "
                        "torchattacks parts, reference settings)", images.cpu(), correct.cpu(), time.perf_counter() - start, broken)


def zero_gradient_count(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> int:
    """Correctly classified examples whose cross-entropy input gradient is exactly zero:
    gradient attacks cannot move them, so their robustness is not evidence."""
    count = 0
    for xb, yb in zip(x.split(batch), y.split(batch)):
        xb = xb.clone().requires_grad_(True)
        logits = model(xb)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, yb, reduction="sum"), xb)
        flat = grad.flatten(1).abs().amax(1) == 0
        count += int((flat & (logits.argmax(1) == yb)).sum())
    return count


def _pgd_config(eps: float, steps: int, restarts: int) -> AttackConfig:
    return AttackConfig(method="pgd", eps=eps, steps=steps, restarts=restarts)  # step 2.5*eps/steps (Madry et al.)


def evaluate_robustness(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: AttackPlan, n_classes: int,
    reporter: Reporter | None = None, title: str = "",
) -> Robustness:
    """Every attack of the plan on ``model`` (inputs on the model's device), then the sanity checks."""
    reporter = reporter or SilentReporter()
    model.eval()
    prefix = f"{title} " if title else ""
    results: list[AttackResult] = []

    def run(name: str, description: str, attack: AttackConfig) -> None:
        torch.manual_seed(plan.seed)
        start = time.perf_counter()
        images, correct = _batched(lambda xb, yb: attack_batch(model, xb, yb, attack), x, y, plan.batch, reporter, prefix + name)
        results.append(AttackResult(name, description, images.cpu(), correct.cpu(), time.perf_counter() - start))
        reporter.end(f"{prefix}{name}: {results[-1].accuracy:.2%}")

    run("clean", "no attack", AttackConfig(method="none", eps=plan.eps))
    run("fgsm", f"FGSM, eps {plan.eps:g}, no random start", AttackConfig(method="fgsm", eps=plan.eps, step=plan.eps, random_start=False))
    for steps, restarts in plan.pgd_settings():
        cfg = _pgd_config(plan.eps, steps, restarts)
        run(f"pgd-{steps}x{restarts}", f"PGD-{steps}, {restarts} restart(s), step {cfg.step_size:.3g}, random start", cfg)
    if plan.level == "full":
        n = len(x) if plan.n_autoattack is None else min(plan.n_autoattack, len(x))
        aa = autoattack(model, x[:n], y[:n], eps=plan.eps, n_classes=n_classes, seed=plan.seed, batch=plan.batch,
                        reporter=reporter, title=prefix + "autoattack")
        results.append(aa)
    zero = zero_gradient_count(model, x, y, plan.batch)
    return Robustness(results, zero, sanity_warnings(results, zero))


def sanity_warnings(results: list[AttackResult], zero_gradients: int) -> list[str]:
    """The warning signs of gradient masking (Athalye et al. 2018; Croce & Hein 2020)."""
    warnings = []
    attacks = [r for r in results if r.name != "clean"]
    for i, weaker in enumerate(attacks):
        for stronger in attacks[i + 1 :]:
            n = min(len(weaker.correct), len(stronger.correct))  # AutoAttack may run on the first n only
            a, b = float(weaker.correct[:n].float().mean()), float(stronger.correct[:n].float().mean())
            if b > a:
                warnings.append(f"{stronger.name} accuracy {b:.2%} is above {weaker.name}'s {a:.2%} on the same "
                                f"{n} images: a stronger attack should never do worse (gradient masking?)")
    if zero_gradients:
        warnings.append(f"{zero_gradients} correctly classified images have an all-zero input gradient: "
                        "gradient-based attacks cannot move them (saturated softmax or masked gradients)")
    for r in results:
        square = r.details.get("square", 0)
        if r.name == "autoattack" and square > SQUARE_WARNING * len(r.correct):
            warnings.append(f"the black-box Square attack broke {square} of {len(r.correct)} images that the white-box "
                            "attacks could not: the gradients mislead the attacks (gradient masking)")
    return warnings


def replay(runner: Runner, robustness: Robustness, labels: torch.Tensor, batch: int = 256) -> dict[str, float]:
    """Accuracy of an exported artifact on the adversarial images crafted on the PyTorch model.

    Same definition as on PyTorch: robust means correct on the clean image and on the
    attack's image; 'all' is the worst case over every attack.
    """
    labels_np = labels.cpu().numpy()
    correct: dict[str, np.ndarray] = {}
    for r in robustness.results:
        images = r.images.numpy()
        preds = np.concatenate([runner.infer(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
        correct[r.name] = preds == labels_np[: len(preds)]
    clean = correct["clean"]
    accuracy = {"clean": float(clean.mean())}
    for name, ok in correct.items():
        if name != "clean":
            accuracy[name] = float((ok & clean[: len(ok)]).mean())
    shortest = min(len(ok) for ok in correct.values())
    accuracy["all"] = float(np.stack([ok[:shortest] for ok in correct.values()]).all(0).mean())
    return accuracy
