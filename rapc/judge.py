"""The judge: the one evaluation protocol behind every robust-accuracy figure rapc prints.

compress's per-epoch model selection and final report, bench, study and export's fidelity
check all call it, so one name always means one attack, and every figure carries the label
of the attack that produced it (name, steps, restarts) and the number of images it saw.

Levels, each including the one before:

    selection  clean, and PGD with step 2.5*eps/steps and at least 2 random restarts: cheap
               enough to pick the best epoch on the whole validation split
    final      + FGSM (one step of eps from the clean image: the floor a stronger attack must
               beat), and the ensemble APGD-CE + APGD-T at AutoAttack's reference settings
               (100 steps, 9 target classes), worst case per image together with PGD
    full       + FAB-T (9 targets) and Square (5000 queries): the standard AutoAttack

PGD alone is not a judge: on the default preset's compressed model PGD-100x2 said 66% where
adding APGD-CE and APGD-T said 57% (NOTES.md). The ensemble is built from torchattacks'
parts at the reference settings; torchattacks' own ``AutoAttack`` class runs its parts with
10 steps and seeds from the clock, so it is not the standard attack.

Each part of the ensemble attacks only what the earlier ones left standing: APGD-CE every
image the model classifies correctly clean, APGD-T what APGD-CE could not break, FAB-T and
Square what PGD and the ensemble could not. APGD-CE does not start from PGD's survivors, so
the ensemble's verdicts do not depend on the PGD settings. Random starts come from a fixed
seed; PGD draws each restart's start for every image of a batch, so with the same seed more
restarts, or more steps at the same step size, can only lower accuracy, image by image.

The warning signs of gradient masking (Athalye et al. 2018; Croce & Hein 2020) come with the
result, never hidden: accuracy that rises with a stronger attack on the same images, PGD more
than 10 points above the ensemble, the black-box Square breaking images the white-box attacks
could not, and input gradients that are exactly zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from rapc.attacks import attack_batch
from rapc.config import AttackConfig, rule_step
from rapc.errors import RapcError, require
from rapc.progress import Reporter, SilentReporter
from rapc.results import AttackFigure, JudgeResult

LEVELS = ("selection", "final", "full")
MIN_RESTARTS = 2
REFERENCE_STEPS = 100  # APGD-CE, APGD-T and FAB-T, as in AutoAttack's standard version
REFERENCE_TARGETS = 9
SQUARE_QUERIES = 5000
GAP_WARNING = 0.10  # PGD this far above the ensemble (on the same images): PGD's gradients mislead it
SQUARE_WARNING = 0.01  # fraction of the images broken only by the black-box Square that raises a warning

ENSEMBLE_PARTS = ("apgd-ce", "apgd-t")
AUTOATTACK_PARTS = ("apgd-ce", "apgd-t", "fab-t", "square")


def pgd_label(steps: int, restarts: int, step: float, random_start: bool = True) -> str:
    """``PGD-20x2 step 0.0375``: steps x restarts, step in pixel units."""
    return f"PGD-{steps}x{restarts} step {step:.3g}" + ("" if random_start else ", no random start")


@dataclass(frozen=True)
class Protocol:
    """Which attacks the judge runs, at which eps (pixel units, L-inf), with which seed.

    ``steps``, ``restarts`` and ``step`` are PGD's (``step`` None: 2.5*eps/steps); the ensemble
    always runs at the reference settings. ``n_ensemble`` caps the images the ensemble (and
    FAB-T and Square) attack: the first n; None: all. ``batch`` is the attack batch size.
    """

    eps: float
    steps: int = 20
    restarts: int = MIN_RESTARTS
    step: float | None = None
    random_start: bool = True
    level: str = "final"
    n_ensemble: int | None = None
    seed: int = 0
    batch: int = 256

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise RapcError(f"judge level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if not 0.0 <= self.eps <= 1.0:
            raise RapcError(f"attack eps must be in [0, 1] (pixel units), got {self.eps:g}")
        if self.steps < 1 or self.restarts < 1:
            raise RapcError(f"PGD needs at least 1 step and 1 restart, got {self.steps}x{self.restarts}")
        if self.step is not None and self.step <= 0:
            raise RapcError(f"PGD step must be positive, got {self.step:g}")
        if self.n_ensemble is not None and self.n_ensemble < 1:
            raise RapcError(f"the ensemble needs at least 1 image, got n_ensemble={self.n_ensemble}")
        if self.batch < 1:
            raise RapcError(f"attack batch must be at least 1, got {self.batch}")

    @classmethod
    def from_config(cls, attack: AttackConfig, level: str = "final", **options: Any) -> Protocol:
        """The judge for a run's ``attack.eval``: its eps, steps and step (None: the rule), and
        max(2, its restarts) restarts. Method 'none' judges clean accuracy only (eps 0)."""
        eps = 0.0 if attack.method == "none" else attack.eps
        restarts = max(MIN_RESTARTS, attack.restarts) if attack.random_start else 1  # without random start every restart is the same
        return cls(eps=eps, steps=attack.steps, restarts=restarts, step=attack.step, random_start=attack.random_start,
                   level=level, **options)

    @property
    def pgd_step(self) -> float:
        return self.step if self.step is not None else rule_step(self.eps, self.steps)

    def pgd_attack(self) -> AttackConfig:
        return AttackConfig(method="pgd", eps=self.eps, step=self.pgd_step, steps=self.steps, restarts=self.restarts,
                            random_start=self.random_start)

    @property
    def pgd_label(self) -> str:
        return pgd_label(self.steps, self.restarts, self.pgd_step, self.random_start)

    def ensemble_label(self, n_classes: int) -> str:
        return f"ensemble {self.pgd_label} + APGD-CE + APGD-T ({REFERENCE_STEPS} steps, {_targets(n_classes)} targets)"

    def autoattack_label(self, n_classes: int) -> str:
        return (f"AutoAttack {self.pgd_label} + APGD-CE + APGD-T + FAB-T ({REFERENCE_STEPS} steps, {_targets(n_classes)} targets)"
                f" + Square ({SQUARE_QUERIES} queries)")


def selection_protocol(attack: AttackConfig, **options: Any) -> Protocol:
    """Per-epoch model selection: clean and the judge's PGD, from the run's ``attack.eval``."""
    return Protocol.from_config(attack, level="selection", **options)


def final_protocol(attack: AttackConfig, **options: Any) -> Protocol:
    """The final figures: clean, FGSM, PGD and the ensemble, from the run's ``attack.eval``."""
    return Protocol.from_config(attack, level="final", **options)


def _targets(n_classes: int) -> int:
    return max(1, min(REFERENCE_TARGETS, n_classes - 1))


@dataclass
class AttackResult:
    """One attack's verdict per image: still correct (clean and under the attack), and the image."""

    name: str  # clean, fgsm, pgd, ensemble, autoattack
    label: str  # the attack, e.g. "PGD-20x2 step 0.0375"
    correct: torch.Tensor  # bool per image (CPU)
    images: torch.Tensor | None = None  # per image: the one that fooled the model, else the last tried (CPU); None: not kept
    seconds: float = 0.0
    details: dict[str, int] = field(default_factory=dict)  # ensembles: images each part broke that the earlier ones had not

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if self.n else 0.0

    @property
    def stderr(self) -> float:
        """Standard error of the accuracy as a binomial proportion, sqrt(p(1-p)/n)."""
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.n) if self.n else 0.0

    def describe(self) -> str:
        """``61.2% ± 1.5 (PGD-20x2 step 0.0375, n=1000)``"""
        return self.figure().describe()

    def figure(self) -> AttackFigure:
        """What JSON keeps of this result: the accuracy, its standard error and label, not the images."""
        return AttackFigure(self.name, self.label, self.n, self.accuracy, self.stderr, self.seconds, dict(self.details))


@dataclass
class Verdict:
    """Every attack of a protocol on one model, and the gradient-masking warnings.

    ``results`` are in nominal order of strength; ``robust`` is the strongest (the last).
    """

    protocol: dict[str, Any]  # asdict(Protocol): plain data, so a verdict saves with torch.save and loads with weights_only
    results: list[AttackResult]
    zero_gradients: int | None  # clean-correct images whose input gradient is exactly zero; None: not counted (selection)
    warnings: list[str]

    def __getitem__(self, name: str) -> AttackResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no {name!r} attack in this verdict; it has {', '.join(self.names)}")

    def __contains__(self, name: str) -> bool:
        return name in self.names

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.results]

    @property
    def clean(self) -> AttackResult:
        return self["clean"]

    @property
    def robust(self) -> AttackResult:
        """The strongest figure the protocol measured: AutoAttack, else the ensemble, else PGD."""
        return self.results[-1]

    def worst_case(self) -> float:
        """Accuracy when every attack gets its try on every image (on the images all attacks saw)."""
        correct = self.worst_case_per_image()
        return float(correct.float().mean()) if len(correct) else 0.0

    def worst_case_per_image(self, n: int | None = None) -> torch.Tensor:
        """Per image, still correct under every attack, on the first ``n`` images (None: all that every attack saw)."""
        n = min(r.n for r in self.results) if n is None else n
        return torch.stack([r.correct[:n] for r in self.results]).all(0)

    def worst_case_label(self) -> str:
        """What :meth:`worst_case` is the worst case of. The strongest attack already takes the worst
        case with PGD (and the ensemble), so FGSM is the only other one to name."""
        others = [r.label for r in self.results if r.name not in ("clean", "pgd", "ensemble", self.robust.name)]
        n = min(r.n for r in self.results)
        return f"worst case per image over {' and '.join([*others, self.robust.label])}, n={n}"

    def summary(self) -> str:
        """One line: clean, then each attack's figure with its label."""
        return f"clean {self.clean.accuracy:.1%} (n={self.clean.n}); " + "; ".join(
            r.describe() for r in self.results if r.name != "clean")

    def result(self) -> JudgeResult:
        """Every figure with its label, n and standard error; no tensors."""
        return JudgeResult(dict(self.protocol), tuple(r.figure() for r in self.results), self.worst_case(), self.worst_case_label(),
                           self.zero_gradients, tuple(self.warnings))

    def to_dict(self) -> dict[str, Any]:
        """For JSON (:meth:`JudgeResult.to_json`)."""
        return self.result().to_json()

    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers and strings only, so it loads with ``torch.load(weights_only=True)``."""
        return {"protocol": dict(self.protocol), "results": [asdict(r) for r in self.results],
                "zero_gradients": self.zero_gradients, "warnings": list(self.warnings)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Verdict:
        return cls(state["protocol"], [AttackResult(**r) for r in state["results"]], state["zero_gradients"], state["warnings"])

    def replay(self, predict: Callable[[np.ndarray], np.ndarray], labels: torch.Tensor, batch: int = 256) -> dict[str, float]:
        """Accuracy of another runtime (an exported file) on the adversarial images crafted here.

        ``predict`` maps a float32 NCHW batch of pixels in [0, 1] to logits. Same definition as
        on PyTorch: robust means correct on the clean image and on the attack's image; 'all' is
        the worst case over every attack. Needs the images (``keep_images=True``).
        """
        return replay_accuracy(self.replay_correct(predict, labels, batch))

    def replay_correct(self, predict: Callable[[np.ndarray], np.ndarray], labels: torch.Tensor,
                       batch: int = 256) -> dict[str, np.ndarray]:
        """:meth:`replay` per image: for each attack, whether the runtime is correct on the clean
        image and on the attack's image (as many images as the attack saw)."""
        labels_np = labels.cpu().numpy()
        correct: dict[str, np.ndarray] = {}
        for r in self.results:
            if r.images is None:
                raise ValueError(f"the {r.name} images were not kept; judge with keep_images=True to replay them")
            images = r.images.numpy()
            preds = np.concatenate([np.asarray(predict(images[i : i + batch])).argmax(1) for i in range(0, len(images), batch)])
            correct[r.name] = preds == labels_np[: len(preds)]
        clean = correct["clean"]
        return {name: ok if name == "clean" else ok & clean[: len(ok)] for name, ok in correct.items()}


def replay_worst_case(correct: dict[str, np.ndarray], n: int | None = None) -> np.ndarray:
    """Per image, correct under every replayed attack, on the first ``n`` images (None: as many as every attack saw)."""
    n = min(len(ok) for ok in correct.values()) if n is None else n
    return np.stack([ok[:n] for ok in correct.values()]).all(0)


def replay_accuracy(correct: dict[str, np.ndarray]) -> dict[str, float]:
    """:meth:`Verdict.replay_correct` as accuracies, and 'all': the worst case over every attack."""
    return {name: float(ok.mean()) for name, ok in correct.items()} | {"all": float(replay_worst_case(correct).mean())}


@contextmanager
def _judging(model: nn.Module, device: torch.device) -> Iterator[None]:
    """The model in eval mode, in the layout its device runs attacks fastest in, under a forked
    random state; the caller's mode, tensors and generators (a training run's) as they were after.

    torchattacks' parts reseed the global generators, hence the fork. On the CPU, oneDNN runs
    convolutions in channels_last 1.5x faster for an attack's forward and input-gradient passes
    (LeNet w=16, one thread): the judge's figures are the same attacks on the same function, its
    convolutions summed in another order. The parameters get their own tensors back afterwards,
    so an optimizer's or a checkpoint's view of them does not change.
    """
    was_training = model.training
    parameters = [(p, p.data) for p in model.parameters()]
    buffers = [(m, dict(m._buffers)) for m in model.modules()]
    model.eval()
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for parameter, data in parameters:
            parameter.data = data
        for module, saved in buffers:
            module._buffers.update(saved)
        model.train(was_training)


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def _logits_width(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x).shape[1])


def _project(adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Into the eps-ball and [0, 1], whatever the attack returned."""
    return torch.max(torch.min(adv, x + eps), x - eps).clamp(0, 1)


def _part(name: str, model: nn.Module, eps: float, n_classes: int, seed: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One of AutoAttack's four parts at its reference settings (torchattacks)."""
    ta = require("torchattacks", "pip install torchattacks")
    if name == "apgd-ce":
        return ta.APGD(model, norm="Linf", eps=eps, steps=REFERENCE_STEPS, n_restarts=1, seed=seed, loss="ce")
    if name == "apgd-t":
        attack = ta.APGDT(model, norm="Linf", eps=eps, steps=REFERENCE_STEPS, n_restarts=1, seed=seed, n_classes=n_classes)
    elif name == "fab-t":
        attack = ta.FAB(model, norm="Linf", eps=eps, steps=REFERENCE_STEPS, n_restarts=1, seed=seed, multi_targeted=True,
                        n_classes=n_classes)
    elif name == "square":
        return square_attack(model, eps, seed)
    else:
        raise ValueError(f"unknown AutoAttack part {name!r}")
    attack.n_target_classes = _targets(n_classes)  # torchattacks reads it from this attribute, not the constructor
    return attack


def square_attack(model: nn.Module, eps: float, seed: int, queries: int = SQUARE_QUERIES) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Square (Andriushchenko et al. 2020) as AutoAttack runs it: L-inf, margin loss, one restart,
    p_init 0.8, its random draws from ``seed``. Black-box: it reads only ``model``'s logits, so the
    model may be anything that returns them (rapc.bench.blackbox wraps a deployed runtime)."""
    ta = require("torchattacks", "pip install torchattacks")
    return ta.Square(model, norm="Linf", eps=eps, n_queries=queries, n_restarts=1, seed=seed)


def zero_gradient_count(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> int:
    """Correctly classified images whose cross-entropy input gradient is exactly zero:
    gradient attacks cannot move them, so their robustness is not evidence."""
    count = 0
    for xb, yb in zip(x.split(batch), y.split(batch)):
        xb = xb.detach().clone().requires_grad_(True)
        logits = model(xb)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, yb, reduction="sum"), xb)
        flat = grad.flatten(1).abs().amax(1) == 0
        count += int((flat & (logits.argmax(1) == yb)).sum())
    return count


def _cascade(model: nn.Module, parts: Iterable[str], x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor,
             images: torch.Tensor, eps: float, n_classes: int, seed: int) -> dict[str, int]:
    """Each part attacks the images still standing; ``correct`` and ``images`` are updated in place.
    Returns how many images each part broke."""
    broken: dict[str, int] = {}
    for name in parts:
        alive = correct.nonzero().squeeze(1)
        if alive.numel() == 0:
            broken[name] = 0
            continue
        adv = _project(_part(name, model, eps, n_classes, seed)(x[alive], y[alive]).detach(), x[alive], eps)
        images[alive] = adv
        correct[alive] = _predict(model, adv) == y[alive]
        broken[name] = len(alive) - int(correct[alive].sum())
    return broken


class _Tally:
    """Per-attack verdicts of the batches seen so far."""

    def __init__(self, keep_images: bool) -> None:
        self.keep_images = keep_images
        self.correct: dict[str, list[torch.Tensor]] = {}
        self.images: dict[str, list[torch.Tensor]] = {}
        self.seconds: dict[str, float] = {}
        self.details: dict[str, dict[str, int]] = {}
        self.hits: dict[str, tuple[int, int]] = {}  # still correct, seen: the running figure without re-concatenating
        self.zero_gradients = 0

    def add(self, name: str, correct: torch.Tensor, images: torch.Tensor, seconds: float, details: dict[str, int] | None = None) -> None:
        correct = correct.cpu()
        self.correct.setdefault(name, []).append(correct)
        hit, seen = self.hits.get(name, (0, 0))
        self.hits[name] = (hit + int(correct.sum()), seen + len(correct))
        if self.keep_images:
            self.images.setdefault(name, []).append(images.detach().cpu().contiguous())
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        for part, count in (details or {}).items():
            totals = self.details.setdefault(name, {})
            totals[part] = totals.get(part, 0) + count

    def running(self, name: str) -> float:
        hit, seen = self.hits[name]
        return hit / seen if seen else 0.0

    def result(self, name: str, label: str, like: torch.Tensor | None = None) -> AttackResult:
        correct = torch.cat(self.correct[name]) if self.correct.get(name) else torch.zeros(0, dtype=torch.bool)
        images = None
        if self.keep_images:
            images = torch.cat(self.images[name]) if self.images.get(name) else (like[:0] if like is not None else None)
        return AttackResult(name, label, correct, images, self.seconds.get(name, 0.0), self.details.get(name, {}))


def _names(level: str) -> list[str]:
    return {"selection": ["clean", "pgd"], "final": ["clean", "fgsm", "pgd", "ensemble"],
            "full": ["clean", "fgsm", "pgd", "ensemble", "autoattack"]}[level]


def _judge_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, protocol: Protocol, n_classes: int, index: int,
                 n_ensemble: int, tally: _Tally, tick: Callable[[], None]) -> None:
    """Every attack of the protocol on one batch; ``n_ensemble`` of its first images also get the ensemble."""

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    clean, seconds = timed(lambda: _predict(model, x) == y)
    tally.add("clean", clean, x, seconds)
    tick()
    if protocol.eps == 0:  # nothing to attack: the robust figure is the clean one
        tally.add("pgd", clean, x, 0.0)
        tick()
        return
    if protocol.level != "selection":
        fgsm = AttackConfig(method="fgsm", eps=protocol.eps, step=protocol.eps, random_start=False)
        (images, correct), seconds = timed(lambda: attack_batch(model, x, y, fgsm))
        tally.add("fgsm", correct, images, seconds)
        tick()
    # PGD's random starts come from their own generator, seeded per batch: the same images get the same starts whatever ran before.
    generator = torch.Generator(device=x.device)
    generator.manual_seed(protocol.seed * 1_000_003 + index)
    (pgd_images, pgd_correct), seconds = timed(lambda: attack_batch(model, x, y, protocol.pgd_attack(), generator=generator))
    tally.add("pgd", pgd_correct, pgd_images, seconds)
    tick()
    if protocol.level == "selection":
        return
    tally.zero_gradients += zero_gradient_count(model, x, y, protocol.batch)

    k = n_ensemble
    xe, ye = x[:k], y[:k]
    start = time.perf_counter()
    cascade_correct, cascade_images = clean[:k].clone(), xe.detach().clone()
    broken = _cascade(model, ENSEMBLE_PARTS, xe, ye, cascade_correct, cascade_images, protocol.eps, n_classes, protocol.seed)
    fooled_by_pgd = ~pgd_correct[:k]
    ensemble_correct = pgd_correct[:k] & cascade_correct
    ensemble_images = torch.where(fooled_by_pgd.view(-1, *[1] * (x.dim() - 1)), pgd_images[:k], cascade_images)
    tally.add("ensemble", ensemble_correct, ensemble_images, time.perf_counter() - start, broken)
    tick()
    if protocol.level != "full":
        return
    start = time.perf_counter()
    aa_correct, aa_images = ensemble_correct.clone(), ensemble_images.clone()
    more = _cascade(model, AUTOATTACK_PARTS[len(ENSEMBLE_PARTS):], xe, ye, aa_correct, aa_images, protocol.eps, n_classes,
                    protocol.seed)
    tally.add("autoattack", aa_correct, aa_images, time.perf_counter() - start, broken | more)
    tick()


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield from zip(x.split(batch), y.split(batch))


def _judge(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], protocol: Protocol, n_batches: int,
           n_classes: int | None, device: torch.device, reporter: Reporter, title: str, keep_images: bool) -> Verdict:
    names = _names(protocol.level)
    per_batch = len(names) if protocol.eps > 0 else 2
    tally = _Tally(keep_images)
    seen, first = 0, None
    reporter.begin(f"{title}judge ({protocol.level})", n_batches * per_batch)

    def tick() -> None:
        reporter.advance({name: tally.running(name) for name in names if tally.correct.get(name)})

    with _judging(model, device):
        torch.manual_seed(protocol.seed)
        for index, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if first is None:
                first = x[:0].cpu()
                if n_classes is None:
                    n_classes = _logits_width(model, x[:1]) if len(x) else 2
            budget = len(x) if protocol.n_ensemble is None else max(0, min(len(x), protocol.n_ensemble - seen))
            _judge_batch(model, x, y, protocol, n_classes or 2, index, budget, tally, tick)
            seen += len(x)
    n_classes = n_classes or 2
    labels = {"clean": "clean", "fgsm": f"FGSM step {protocol.eps:g}", "pgd": protocol.pgd_label if protocol.eps > 0 else "no attack (eps 0)",
              "ensemble": protocol.ensemble_label(n_classes), "autoattack": protocol.autoattack_label(n_classes)}
    present = [name for name in names if name in tally.correct or name in ("clean", "pgd")]
    results = [tally.result(name, labels[name], first) for name in present]
    zero = None if protocol.level == "selection" or protocol.eps == 0 else tally.zero_gradients
    verdict = Verdict(asdict(protocol), results, zero, masking_warnings(results, zero))
    reporter.end(f"{title}{verdict.summary()}")
    return verdict


def judge(model: nn.Module, x: torch.Tensor, y: torch.Tensor, protocol: Protocol, n_classes: int | None = None,
          reporter: Reporter | None = None, title: str = "", keep_images: bool = True) -> Verdict:
    """Every attack of ``protocol`` on ``model`` over images ``x`` (pixels in [0, 1]) and labels ``y``.

    The images are moved batch by batch to the model's device (put them there first to save
    the copies). ``n_classes`` None: read from the model's output. ``keep_images`` keeps every
    attack's adversarial images (on the CPU) for :meth:`Verdict.replay`. The model is judged
    in eval mode and float32; its mode and the global random state are restored afterwards.
    """
    device = next(model.parameters()).device
    n_batches = math.ceil(len(x) / protocol.batch)
    return _judge(model, _batches(x, y, protocol.batch), protocol, n_batches, n_classes, device,
                  reporter or SilentReporter(), f"{title} " if title else "", keep_images)


def judge_loader(model: nn.Module, data: DataLoader, protocol: Protocol, device: torch.device | None = None,
                 n_classes: int | None = None, reporter: Reporter | None = None, title: str = "",
                 keep_images: bool = False) -> Verdict:
    """:func:`judge` over a loader's batches (taken as they come; use an unshuffled loader for
    figures that repeat). ``protocol.n_ensemble`` counts the loader's first images."""
    device = device or next(model.parameters()).device
    return _judge(model, data, protocol, len(data), n_classes, device, reporter or SilentReporter(),
                  f"{title} " if title else "", keep_images)


def select(model: nn.Module, data: DataLoader, attack: AttackConfig, device: torch.device | None = None,
           seed: int = 0) -> Verdict:
    """Per-epoch model selection on the validation loader: clean and the judge's PGD from ``attack``
    (the run's ``attack.eval``). ``verdict.robust.accuracy`` is the figure to maximize;
    ``verdict.robust.label`` names it."""
    return judge_loader(model, data, selection_protocol(attack, seed=seed), device)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, n_classes: int | None = None,
               seed: int = 0, reporter: Reporter | None = None, title: str = "autoattack") -> AttackResult:
    """The standard AutoAttack alone (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T and Square at the
    reference settings, each on what the earlier ones left standing. The judge's ``full`` level
    runs the same parts together with PGD."""
    reporter = reporter or SilentReporter()
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    with _judging(model, device):
        n_classes = n_classes or _logits_width(model, x[:1])
        start = time.perf_counter()
        correct = _predict(model, x) == y
        images = x.detach().clone()
        reporter.begin(title, 1)
        broken = _cascade(model, AUTOATTACK_PARTS, x, y, correct, images, eps, n_classes, seed)
        reporter.end(f"{title}: {float(correct.float().mean()):.1%} (n={len(y)}), broken by {broken}")
    label = (f"AutoAttack APGD-CE + APGD-T + FAB-T ({REFERENCE_STEPS} steps, {_targets(n_classes)} targets)"
             f" + Square ({SQUARE_QUERIES} queries)")
    return AttackResult("autoattack", label, correct.cpu(), images.cpu(), time.perf_counter() - start, broken)


def masking_warnings(results: list[AttackResult], zero_gradients: int | None) -> list[str]:
    """The warning signs of gradient masking (Athalye et al. 2018; Croce & Hein 2020), as sentences.

    ``results`` in nominal order of strength (clean first); an attack may have seen only the
    first n images of the earlier ones (the ensemble's cap), and is compared on those.
    """
    warnings = []
    attacks = [r for r in results if r.name != "clean"]

    def accuracy(r: AttackResult, n: int) -> float:
        return float(r.correct[:n].float().mean()) if n else 0.0

    for j, stronger in enumerate(attacks):
        rises = [(accuracy(w, n), w, n) for w in attacks[:j] for n in [min(w.n, stronger.n)]
                 if accuracy(stronger, n) > accuracy(w, n)]
        if rises:
            low, weaker, n = min(rises, key=lambda t: t[0])
            warnings.append(f"{stronger.label} accuracy {accuracy(stronger, n):.1%} is above {weaker.label}'s {low:.1%} on "
                            f"the same {n} images: a stronger attack should never do worse (gradient masking?)")
    by_name = {r.name: r for r in results}
    pgd, ensemble = by_name.get("pgd"), by_name.get("ensemble")
    if pgd is not None and ensemble is not None and ensemble.n:
        n = ensemble.n
        gap = accuracy(pgd, n) - ensemble.accuracy
        if gap > GAP_WARNING:
            warnings.append(f"{pgd.label} says {accuracy(pgd, n):.1%} but the {ensemble.label} {ensemble.accuracy:.1%} on the "
                            f"same {n} images: a gap of {gap * 100:.0f} points (more than {GAP_WARNING * 100:.0f}) means PGD's "
                            "gradients mislead it (gradient masking?); trust the ensemble's figure")
    if zero_gradients:
        warnings.append(f"{zero_gradients} correctly classified images have an all-zero input gradient: "
                        "gradient-based attacks cannot move them (saturated softmax or masked gradients)")
    for r in results:
        square = r.details.get("square", 0)
        if square > SQUARE_WARNING * r.n:
            warnings.append(f"the black-box Square attack broke {square} of {r.n} images that the white-box attacks "
                            "could not: the gradients mislead the attacks (gradient masking)")
    return warnings


def _ensemble_after(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, pgd: AttackResult,
                    protocol: Protocol, n_classes: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The ensemble's verdict on images whose clean and PGD verdicts (and PGD images) are known,
    combined as in :func:`_judge_batch`: APGD-CE and APGD-T on the clean-correct images, worst case with PGD."""
    correct, images = clean.clone(), x.detach().clone()
    broken = _cascade(model, ENSEMBLE_PARTS, x, y, correct, images, protocol.eps, n_classes, protocol.seed)
    pgd_correct, pgd_images = pgd.correct.to(x.device), pgd.images.to(x.device)
    fooled = ~pgd_correct
    return (pgd_correct & correct, torch.where(fooled.view(-1, *[1] * (x.dim() - 1)), pgd_images, images), broken)


def _autoattack_after(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ensemble: AttackResult, protocol: Protocol,
                      n_classes: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """FAB-T and Square on what the ensemble left standing, as at the ``full`` level."""
    correct, images = ensemble.correct.to(x.device).clone(), ensemble.images.to(x.device).clone()
    more = _cascade(model, AUTOATTACK_PARTS[len(ENSEMBLE_PARTS):], x, y, correct, images, protocol.eps, n_classes, protocol.seed)
    return correct, images, ensemble.details | more


def _slice(result: AttackResult, start: int, stop: int) -> AttackResult:
    """Images start:stop of a result; the counts per part (kept for the whole only) go with the first slice."""
    return AttackResult(result.name, result.label, result.correct[start:stop],
                        None if result.images is None else result.images[start:stop], 0.0, result.details if start == 0 else {})


def extend(verdict: Verdict, model: nn.Module, x: torch.Tensor, y: torch.Tensor, protocol: Protocol,
           n_classes: int | None = None, reporter: Reporter | None = None, title: str = "") -> Verdict:
    """``verdict``, the judge's on the first images of ``x`` (pixels in [0, 1]) with its images kept,
    carried on to ``protocol`` over all of ``x``: only what it lacks is judged.

    The caller vouches that ``verdict`` judged this model on these first images with ``protocol``'s
    attacks, seed and batch (rapc.judgement checks it). What it may lack: the images after its
    own (every attack, in the judge's batches numbered on from its last, so PGD's random starts
    are a fresh judge's when its n is a whole number of batches), the ensemble on more of its
    images, and FAB-T and Square (``full``). The added parts draw their random starts in their
    own batches: as strong as a fresh judge, not always equal to it image by image. With nothing
    to add, the verdict comes back at ``protocol``'s level (a ``full`` one without FAB-T and
    Square for ``final``), its figures unchanged.
    """
    if protocol.eps == 0 or protocol.level == "selection":
        raise ValueError("only a final or full judgement with a positive eps can be extended")
    old = {r.name: r for r in verdict.results}
    n_old, n_old_ensemble = old["clean"].n, old["ensemble"].n
    n = len(x)
    n_ensemble = n if protocol.n_ensemble is None else min(n, protocol.n_ensemble)
    if n < n_old or n_ensemble < n_old_ensemble or any(old[name].images is None for name in old):
        raise ValueError(f"cannot extend a verdict on n={n_old} (ensemble n={n_old_ensemble}) to n={n} (ensemble n={n_ensemble}), "
                         "or one without its images")
    names = _names(protocol.level)
    full = "autoattack" in names
    reporter = reporter or SilentReporter()
    device = next(model.parameters()).device
    tally = _Tally(keep_images=True)
    tally.zero_gradients = verdict.zero_gradients or 0
    for name in ("clean", "fgsm", "pgd", "ensemble") + (("autoattack",) if full and "autoattack" in old else ()):
        r = old[name]
        tally.add(name, r.correct, r.images, r.seconds, r.details)
    batch = protocol.batch
    to_aa = [] if not full or "autoattack" in old else list(range(0, n_old_ensemble, batch))
    to_ensemble = list(range(n_old_ensemble, min(n_ensemble, n_old), batch))
    new = list(range(n_old, n, batch))
    reporter.begin(f"{title} judge ({protocol.level}): what the saved judgement lacks" if title else "judge: what the saved judgement lacks",
                   len(to_aa) + len(to_ensemble) * (1 + full) + len(new) * len(names))

    def tick() -> None:
        reporter.advance({name: tally.running(name) for name in names if tally.correct.get(name)})

    def on_device(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x[start:stop].to(device), y[start:stop].to(device)

    with _judging(model, device):
        torch.manual_seed(protocol.seed)
        if n_classes is None:
            n_classes = _logits_width(model, x[:1].to(device))
        for start in to_aa:  # FAB-T and Square on the saved ensemble's survivors
            stop = min(start + batch, n_old_ensemble)
            began = time.perf_counter()
            correct, images, details = _autoattack_after(model, *on_device(start, stop), _slice(old["ensemble"], start, stop),
                                                         protocol, n_classes)
            tally.add("autoattack", correct, images, time.perf_counter() - began, details)
            tick()
        for start in to_ensemble:  # the ensemble on saved images it had not attacked
            stop = min(start + batch, n_ensemble, n_old)
            xb, yb = on_device(start, stop)
            began = time.perf_counter()
            correct, images, broken = _ensemble_after(model, xb, yb, old["clean"].correct[start:stop].to(device),
                                                      _slice(old["pgd"], start, stop), protocol, n_classes)
            tally.add("ensemble", correct, images, time.perf_counter() - began, broken)
            tick()
            if full:
                began = time.perf_counter()
                ensemble = AttackResult("ensemble", "", correct, images, 0.0, broken)
                correct, images, details = _autoattack_after(model, xb, yb, ensemble, protocol, n_classes)
                tally.add("autoattack", correct, images, time.perf_counter() - began, details)
                tick()
        first_index = math.ceil(n_old / batch)
        for i, start in enumerate(new):  # images the verdict never saw: every attack, as the judge does
            xb, yb = on_device(start, start + batch)
            budget = max(0, min(len(xb), n_ensemble - start))
            _judge_batch(model, xb, yb, protocol, n_classes, first_index + i, budget, tally, tick)
    labels = {r.name: r.label for r in verdict.results} | {"autoattack": protocol.autoattack_label(n_classes)}
    results = [tally.result(name, labels[name], x[:0]) for name in names]
    extended = Verdict(asdict(protocol), results, tally.zero_gradients, masking_warnings(results, tally.zero_gradients))
    reporter.end(f"{title} {extended.summary()}" if title else extended.summary())
    return extended
