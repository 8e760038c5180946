"""The judge's figures as JSON holds them: one attack's figure, one model's verdict, one saved
model's size beside its verdict.

summary.json, a study's row.json and bench.json are read by the CLI, the study, the bench report
and the benchmarks; these types are the one place that knows their keys, so a reader asks for
``result.robust.accuracy`` rather than ``data["judge"]["attacks"][-1]["accuracy"]``. Every figure
keeps its attack's label and n: a robust accuracy never travels without what produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rapc.errors import RapcError

_ROBUST_KEYS = ("name", "label", "n", "accuracy", "stderr")


@dataclass(frozen=True)
class AttackFigure:
    """One attack's accuracy on n images, with its standard error and the attack that produced it."""

    name: str  # clean, fgsm, pgd, ensemble, autoattack
    label: str  # e.g. "PGD-20x2 step 0.0375"
    n: int
    accuracy: float
    stderr: float
    seconds: float = 0.0
    broken_by: dict[str, int] = field(default_factory=dict)  # ensembles: images each part broke first

    def describe(self) -> str:
        """``61.2% ± 1.5 (PGD-20x2 step 0.0375, n=1000)``"""
        return f"{self.accuracy:.1%} ± {self.stderr:.1%} ({self.label}, n={self.n})"

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "label": self.label, "n": self.n, "accuracy": self.accuracy, "stderr": self.stderr,
               "seconds": self.seconds}
        return out | ({"broken_by": dict(self.broken_by)} if self.broken_by else {})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttackFigure:
        return cls(data["name"], data["label"], data["n"], data["accuracy"], data["stderr"], data.get("seconds", 0.0),
                   dict(data.get("broken_by", {})))


@dataclass(frozen=True)
class JudgeResult:
    """A verdict without its tensors: every attack's figure in nominal order of strength (the
    strongest last), the worst case per image over them, and the gradient-masking warnings."""

    protocol: dict[str, Any]  # asdict(judge.Protocol)
    attacks: tuple[AttackFigure, ...]  # clean first
    worst_case: float
    worst_case_label: str
    zero_gradients: int | None  # clean-correct images with an exactly zero input gradient; None: not counted
    warnings: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> AttackFigure:
        for attack in self.attacks:
            if attack.name == name:
                return attack
        raise KeyError(f"no {name!r} attack in this verdict; it has {', '.join(a.name for a in self.attacks)}")

    @property
    def clean(self) -> AttackFigure:
        return self["clean"]

    @property
    def robust(self) -> AttackFigure:
        """The strongest figure measured: AutoAttack, else the ensemble, else PGD."""
        return self.attacks[-1]

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": dict(self.protocol), "clean": self.clean.accuracy,
            "robust": {k: v for k, v in self.robust.to_json().items() if k in _ROBUST_KEYS},
            "attacks": [a.to_json() for a in self.attacks], "worst_case": self.worst_case, "worst_case_label": self.worst_case_label,
            "zero_gradients": self.zero_gradients, "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JudgeResult:
        """``clean`` and ``robust`` in the JSON repeat figures of ``attacks``, for readers without this type."""
        return cls(dict(data["protocol"]), tuple(AttackFigure.from_json(a) for a in data["attacks"]), data["worst_case"],
                   data["worst_case_label"], data["zero_gradients"], tuple(data["warnings"]))


@dataclass(frozen=True)
class ModelResult:
    """One saved model of a run: its size (measure.summary), its weights file and the judge's verdict."""

    params: int
    macs: int
    sparsity: float
    file_bytes: int
    judge: JudgeResult

    def size(self, metric: str) -> int:
        """The model's ``macs`` or ``params``: what a budget counts."""
        sizes = {"macs": self.macs, "params": self.params}
        if metric not in sizes:
            raise KeyError(f"no size {metric!r}; there are {', '.join(sizes)}")
        return sizes[metric]

    def to_json(self) -> dict[str, Any]:
        """``clean``, ``pgd`` and ``robust`` repeat the verdict's figures for readers of summary.json
        without this type (and for older rapc, which read them)."""
        return {"params": self.params, "macs": self.macs, "sparsity": self.sparsity, "file_bytes": self.file_bytes,
                "clean": self.judge.clean.accuracy, "pgd": self.judge["pgd"].accuracy, "robust": self.judge.robust.accuracy,
                "judge": self.judge.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any], what: str = "summary.json") -> ModelResult:
        if "judge" not in data:
            raise RapcError(f"{what} was written before the judge's per-attack figures; `rapc report RUN` judges the run again")
        return cls(data["params"], data["macs"], data["sparsity"], data["file_bytes"], JudgeResult.from_json(data["judge"]))
