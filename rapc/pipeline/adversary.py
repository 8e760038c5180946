"""What a training step learns from: the adversarial inputs of a batch, from a random start or
from the perturbation each example's last visit ended with, and free training's replays.

Carried perturbations (ATTA, Zheng et al. 2020, arXiv 1912.11969): adversarial examples of one
epoch stay adversarial in the next, so an attack that starts where the example's previous attack
ended goes on accumulating strength across epochs, and one or two steps a visit do the work of
many from a random start. Free adversarial training (Shafahi et al. 2019, arXiv 1904.12843)
replays each batch ``steps`` times; the backward pass of every replay gives the weights their
gradient and the perturbation its next signed step, so the attack costs no extra passes.

The store keeps one perturbation per training example, indexed by the dataset index the loader
yields, in 8 bits a pixel scaled to the config's eps (50,000 CIFAR-10 images: 150 MB). Codes are
truncated towards zero, so a stored perturbation stays inside the eps-ball and keeps its image
inside [0, 1]. Under torchrun each rank trains on a fixed shard of the examples (ShardSampler) and
keeps theirs only; a checkpoint holds the whole store, assembled by index, so that a run resumes
with any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from rapc.attacks import perturb
from rapc.config import AttackConfig
from rapc.pipeline.distributed import Ranks

LEVELS = 127  # int8 codes: a perturbation of eps is 127


@dataclass
class PerturbationStore:
    """This rank's examples' last perturbations: rank r holds examples r, r + world, r + 2*world, ..."""

    codes: torch.Tensor  # int8 [rows, *image shape]: perturbation * LEVELS / eps, truncated
    visited: torch.Tensor  # bool [rows]: attacked at least once
    eps: float  # the config's full eps: the scale of the codes, whatever an epoch's ramp uses
    n: int  # examples in the training set, over all ranks
    ranks: Ranks

    @classmethod
    def make(cls, n: int, shape: torch.Size, eps: float, device: torch.device, ranks: Ranks = Ranks()) -> PerturbationStore:
        rows = len(range(ranks.rank, n, ranks.world_size))
        return cls(torch.zeros(rows, *shape, dtype=torch.int8, device=device),
                   torch.zeros(rows, dtype=torch.bool, device=device), eps, n, ranks)

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        return index.to(self.codes.device) // self.ranks.world_size

    def start(self, index: torch.Tensor, x: torch.Tensor, eps: float, random_start: bool) -> torch.Tensor:
        """The first perturbation of the batch's attacks: each example's stored one, or for an example
        never attacked a uniform draw in the ``eps``-ball (zero without random start)."""
        rows = self._rows(index)
        delta = self.codes[rows].to(x.dtype).mul_(self.eps / LEVELS)
        fresh = ~self.visited[rows]
        if fresh.any():
            new = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
            delta[fresh] = new[fresh]
        return delta

    def keep(self, index: torch.Tensor, delta: torch.Tensor) -> None:
        rows = self._rows(index)
        self.codes[rows] = (delta.detach() * (LEVELS / self.eps)).trunc_().clamp_(-LEVELS, LEVELS).to(torch.int8)
        self.visited[rows] = True

    def perturbation(self, index: int) -> torch.Tensor:
        """Example ``index``'s stored perturbation in pixel units (of an example this rank holds)."""
        return self.codes[index // self.ranks.world_size].float() * (self.eps / LEVELS)

    def state_dict(self) -> dict[str, torch.Tensor | float]:
        """The whole store by dataset index, gathered from every rank (each must call it)."""
        shards = self.ranks.gather((self.codes.cpu(), self.visited.cpu()))
        codes = torch.zeros(self.n, *self.codes.shape[1:], dtype=torch.int8)
        visited = torch.zeros(self.n, dtype=torch.bool)
        for rank, (shard_codes, shard_visited) in enumerate(shards):
            codes[rank::len(shards)], visited[rank::len(shards)] = shard_codes, shard_visited
        return {"codes": codes, "visited": visited, "eps": self.eps}

    def load_state_dict(self, state: dict[str, torch.Tensor | float]) -> None:
        """This rank's shard of a saved store, whatever number of processes saved it."""
        share = slice(self.ranks.rank, None, self.ranks.world_size)
        self.codes.copy_(state["codes"][share])  # type: ignore[index]
        self.visited.copy_(state["visited"][share])  # type: ignore[index]
        self.eps = float(state["eps"])


class Indexed(Dataset):
    """A dataset whose examples carry their index: (image, label, index), for the perturbation store."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.base[i]
        return image, label, i


def adversarial_inputs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None, attack: AttackConfig,
    store: PerturbationStore | None = None, autocast_dtype: torch.dtype | None = None,
) -> Iterator[torch.Tensor]:
    """The inputs of the training steps on one batch: its adversarial images, once; under ``free``,
    ``steps`` replays, each perturbed by the input gradient of the step before (the caller's backward
    pass leaves it on the input). With a store, attacks start from and save each example's perturbation."""
    if store is not None and index is None:
        raise ValueError("carried perturbations need the dataset index of each example: iterate an Indexed dataset")
    start = store.start(index, x, attack.eps, attack.random_start) if store is not None else None
    if attack.method != "free":
        adversarial = perturb(model, x, y, attack, autocast_dtype, start=start)
        if store is not None:
            store.keep(index, adversarial - x)
        yield adversarial
        return
    yield from _free_replays(x, attack, start, store, index)


def _free_replays(x: torch.Tensor, attack: AttackConfig, start: torch.Tensor | None,
                  store: PerturbationStore | None, index: torch.Tensor | None) -> Iterator[torch.Tensor]:
    x = x.detach()
    lower, upper = (-x).clamp_(min=-attack.eps), (1 - x).clamp_(max=attack.eps)
    if start is None:
        start = torch.empty_like(x).uniform_(-attack.eps, attack.eps) if attack.random_start else torch.zeros_like(x)
    delta = start.clamp_(lower, upper)
    for _ in range(attack.steps):
        delta.requires_grad_(True)
        yield x + delta
        if delta.grad is None:
            raise RuntimeError("free adversarial training: the training step ran no backward pass through its input")
        delta = (delta.detach() + attack.step_size * delta.grad.sign()).clamp_(lower, upper)
    if store is not None:
        store.keep(index, delta)
