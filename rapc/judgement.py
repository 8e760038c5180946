"""A judge's verdict kept on disk, and when it may stand in for judging again.

compress's final judge saves each model's verdict (``RunPaths.judgement``) and bench its own
(RUN/bench/attacks/); bench takes one instead of attacking again when nothing the verdict
depends on has changed: the weights file (its sha256), the test images and labels (theirs, in
order), and the judge's attacks, seed and batch size (PGD draws its random starts per batch).
Asked for more (more images, the ensemble on more of them, FAB-T and Square), it judges only
what the verdict lacks (:func:`rapc.judge.extend`); asked for less, it judges afresh, since a
part of a verdict is not what the judge would say on fewer images.

The file is safetensors: per attack ``NAME.correct`` (bool, one per image) and, except for
clean (the test images themselves), ``NAME.images`` (float32 NCHW, pixels in [0, 1]: per image
the adversarial image that fooled the model, else the last tried), which replay on exported
files needs. Its header's ``rapc.judgement`` (JSON) holds the protocol, each attack's label,
seconds and counts per part, the zero-gradient count and warnings, the fingerprints above and
the torchattacks version that ran them (another version is judged afresh).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rapc.judge import LEVELS, AttackResult, Protocol, Verdict
from rapc.rundir import atomic_write

FORMAT = 1  # raised whenever the file's contents change: an older file is then judged afresh, never misread
HEADER = "rapc.judgement"
ATTACK_SETTINGS = ("eps", "steps", "restarts", "step", "random_start", "seed", "batch")  # what per-image verdicts depend on


def attacks_version() -> str:
    """The attack library's version: another one may find other images, so its verdicts are not reused."""
    return metadata.version("torchattacks")


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def images_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """The test images (float32) and labels (int64), in order."""
    digest = hashlib.sha256(images.detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Judgement:
    """A saved verdict, and what it was judged on."""

    verdict: Verdict
    weights: str  # sha256 of the weights file
    images: str  # images_digest of the n test images
    device: str  # where the attacks ran (figures from a GPU and a CPU may differ in the last images)
    attacks: str  # the torchattacks version that ran the ensemble

    @property
    def n(self) -> int:
        return self.verdict.clean.n

    @property
    def protocol(self) -> Protocol:
        return Protocol(**self.verdict.protocol)

    def describe(self) -> str:
        """``n=1000, ensemble n=500`` (and ``, FAB-T and Square`` at the full level)."""
        ensemble = f", ensemble n={self.verdict['ensemble'].n}" if "ensemble" in self.verdict else ""
        return f"n={self.n}{ensemble}" + (", FAB-T and Square" if "autoattack" in self.verdict else "")

    def covers(self, protocol: Protocol, weights: str, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """Whether this is a part of what ``protocol`` asks on these weights and images: then the
        judge need only add to it (nothing, when it is all of it)."""
        mine = self.protocol
        n = len(labels)
        n_ensemble = n if protocol.n_ensemble is None else min(n, protocol.n_ensemble)
        return (self.weights == weights and mine.level != "selection" and self.attacks == attacks_version()
                and all(getattr(mine, k) == getattr(protocol, k) for k in ATTACK_SETTINGS)
                and self.n <= n and self.verdict["ensemble"].n <= n_ensemble
                and self.images == images_digest(images[: self.n], labels[: self.n]))

    def is_all_of(self, protocol: Protocol, n: int) -> bool:
        """Whether, once it covers the request, there is nothing to add: same n, same ensemble n, the level or above."""
        n_ensemble = n if protocol.n_ensemble is None else min(n, protocol.n_ensemble)
        return (self.n == n and self.verdict["ensemble"].n == n_ensemble
                and LEVELS.index(self.protocol.level) >= LEVELS.index(protocol.level))


def save(path: Path, verdict: Verdict, weights: Path, labels: torch.Tensor, device: torch.device | str) -> Path:
    """``verdict`` (judged with its images kept) of the model in the file ``weights``, on its clean images and ``labels``."""
    clean = verdict.clean
    if any(r.images is None for r in verdict.results):
        raise ValueError("a judgement is saved with its adversarial images; judge with keep_images=True")
    tensors = {f"{r.name}.correct": r.correct.contiguous() for r in verdict.results}
    tensors |= {f"{r.name}.images": r.images.float().contiguous() for r in verdict.results if r.name != "clean"}
    header = {
        "format": FORMAT, "weights": file_digest(weights), "images": images_digest(clean.images, labels[: clean.n]),
        "device": str(device), "attacks": attacks_version(), "protocol": dict(verdict.protocol),
        "results": [{"name": r.name, "label": r.label, "seconds": r.seconds, "details": r.details} for r in verdict.results],
        "zero_gradients": verdict.zero_gradients, "warnings": list(verdict.warnings),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={HEADER: json.dumps(header)}))


def load(path: Path, images: torch.Tensor) -> Judgement | None:
    """The judgement in ``path``, its clean images taken from ``images`` (the test images, in order);
    None when there is none, or it is damaged or of another format: then the judge runs again."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})[HEADER])
        if header.get("format") != FORMAT:
            return None
        tensors = load_file(str(path))
        results = []
        for r in header["results"]:
            correct = tensors[f"{r['name']}.correct"]
            shown = images[: len(correct)] if r["name"] == "clean" else tensors[f"{r['name']}.images"]
            results.append(AttackResult(r["name"], r["label"], correct, shown, r["seconds"], r["details"]))
        verdict = Verdict(header["protocol"], results, header["zero_gradients"], header["warnings"])
        return Judgement(verdict, header["weights"], header["images"], header["device"], header["attacks"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None
