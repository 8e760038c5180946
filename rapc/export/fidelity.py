"""Does an exported artifact compute what the PyTorch model computes? On clean test
images and on PGD examples crafted against the PyTorch model, because a graph can
agree on easy inputs and drift exactly where robustness is decided.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from rapc.export.runners import Runner


@dataclass(frozen=True)
class Agreement:
    n: int
    max_abs_diff: float
    top1_agreement: float  # fraction of inputs with the same predicted class
    accuracy: float  # of the candidate, against the labels

    def as_dict(self) -> dict:
        return asdict(self)


def compare(reference: Runner, candidate: Runner, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> Agreement:
    """Run both runners on ``images`` in batches and compare their logits."""
    diffs, agree, correct = [], 0, 0
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        want, got = reference.infer(chunk), candidate.infer(chunk)
        diffs.append(float(np.abs(want - got).max()))
        agree += int((want.argmax(1) == got.argmax(1)).sum())
        correct += int((got.argmax(1) == labels[start : start + batch]).sum())
    n = len(images)
    return Agreement(n, max(diffs), agree / n, correct / n)
