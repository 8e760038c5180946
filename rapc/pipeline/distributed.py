"""Several processes, one run: ``torchrun --nproc_per_node N -m rapc compress ...``.

Everything rapc does differently under torchrun is here. DistributedDataParallel
averages the gradients, so every rank holds the same weights after every step;
whatever is computed from the weights alone (ADMM's Z and U, masks, the best
epoch) is then the same everywhere. Only rank 0 writes files, shows progress and
evaluates (validation and test sets are small next to training); the others wait
for its figures where a decision depends on them.

The batch size is per rank: the global batch of a step is N x ``data.batch_size``.

Only rank 0 writes checkpoints, so they gather what differs between ranks: the global
generators (attacks' random starts are drawn per rank) and the running sums of an epoch
in progress (saved summed over ranks). ``torchrun ... -m rapc compress --resume RUN``
continues a run with any number of processes; with the number that wrote it, exactly as
if it had not stopped (up to float rounding of the logged sums).

A stop (Ctrl-C, SIGTERM) must happen at the same step on every rank, or one waits forever
in the next collective: see ``agreed_stop``.

One process without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) creates no
process group and runs exactly as before. torchrun with one process is a distributed run
of one rank: the same sampler and sample order as N processes with N times smaller
batches, which is how the tests compare them.
"""

from __future__ import annotations

import gc
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rapc.errors import RapcError

T = TypeVar("T")


def env_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun); usable before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class Ranks:
    """Where this process stands; ``enabled`` False is the plain one-process run (no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda`` (or ``auto``'s cuda) becomes ``cuda:LOCAL_RANK``."""
        if self.enabled and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module that trains: DDP around ``model`` under torchrun, ``model`` itself otherwise."""
        if not self.enabled:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def train_loader(self, dataset: Dataset, batch_size: int, *, seed: int, workers: int, pin: bool,
                     fixed_shards: bool = False) -> DataLoader | None:
        """Each rank's share of the shuffled training set (``batch_size`` per rank); None for one process.
        ``fixed_shards``: the same examples every epoch (ShardSampler), for carried perturbations.

        The loader keeps a generator although the sampler draws none: stage checkpoints save its state.
        """
        if not self.enabled:
            return None
        sampler = (ShardSampler if fixed_shards else DistributedSampler)(dataset, self.world_size, self.rank, shuffle=True, seed=seed)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(seed),
            num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
        )

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a copy); ``values`` itself for one process."""
        if not self.enabled:
            return values
        total = values.clone()
        dist.all_reduce(total)
        return total

    def from_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0, its (picklable) result on every rank; the others wait for it.

        A RapcError that ``compute`` raises is raised on every rank, so none waits for a result
        that never comes.
        """
        if not self.enabled:
            return compute()
        outcome: list[tuple[T | None, RapcError | None] | None] = [None]
        if self.is_main:
            try:
                outcome = [(compute(), None)]
            except RapcError as exc:
                outcome = [(None, exc)]
        dist.broadcast_object_list(outcome, src=0)
        result, error = outcome[0]  # type: ignore[misc]
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def gather(self, value: T) -> list[T]:
        """Every rank's (picklable) ``value``, in rank order, on every rank; ``[value]`` for one process."""
        if not self.enabled:
            return [value]
        values: list[T | None] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values  # type: ignore[return-value]

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is set on any rank (one small all-reduce on ``device``, a host-device sync on GPU)."""
        if not self.enabled:
            return flag
        return bool(self.all_sum(torch.tensor(float(flag), device=device)) > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def assert_same(self, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        """Raise if ``tensors`` differ between ranks (a checksum per tensor, compared by min and max).

        Cheap enough to run at every ADMM update: one small all-reduce.
        """
        if not self.enabled:
            return
        local = torch.stack([t.detach().double().sum() for t in tensors.values()] + [t.detach().double().abs().sum() for t in tensors.values()])
        high, low = local.clone(), -local
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MAX)
        if not torch.equal(high, -low):
            raise RuntimeError(f"rank {self.rank}: {what} differ between ranks; distributed training went out of step")


class ShardSampler(DistributedSampler):
    """Rank r always trains on examples r, r + world, ... (shuffled anew each epoch), so that the
    perturbations it carries are of examples it will see again. DistributedSampler instead deals
    every epoch's shuffle out afresh. Shards are padded to equal lengths (the ranks take equal steps)."""

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shard = torch.arange(self.rank, len(self.dataset), self.num_replicas)  # type: ignore[arg-type]
        order = shard[torch.randperm(len(shard), generator=generator)].tolist()
        return iter((order * 2)[: self.num_samples])



# How often the ranks of a torchrun compare their stop requests, in training steps.
STOP_CHECK_STEPS = 10


def agreed_stop(ranks: Ranks, requested: Callable[[], bool], device: torch.device) -> Callable[[int], bool]:
    """Whether training stops after step ``step`` of an epoch, given this process's stop request.

    One process stops at the first step boundary after a Ctrl-C. The ranks of a torchrun receive
    their signals at slightly different steps but must stop at the same one; they compare their
    requests only every STOP_CHECK_STEPS steps of an epoch (and at its end) rather than pay a
    host-device sync each step, so they stop up to that many steps after the signal. torchrun
    kills ranks still running 30 s after it forwarded the signal: where STOP_CHECK_STEPS steps and a
    checkpoint take longer, raise its ``--shutdown-timeout``.
    """
    if not ranks.enabled:
        return lambda step: requested()
    return lambda step: step % STOP_CHECK_STEPS == 0 and ranks.any(requested(), device)


def rapc_command(args: str) -> str:
    """The command that runs ``rapc ARGS`` the way this process was started: with torchrun's
    process counts under torchrun (its rendezvous options, for several nodes, left to the user)."""
    if not under_torchrun():
        return f"rapc {args}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    nodes = int(os.environ["WORLD_SIZE"]) // per_node
    launcher = f"torchrun --nnodes {nodes} ... " if nodes > 1 else "torchrun "
    return f"{launcher}--nproc_per_node {per_node} -m rapc {args}"


def set_epoch(data: DataLoader, stage: str, epoch: int) -> None:
    """A new shuffle for each epoch of each stage (DistributedSampler draws from seed + epoch)."""
    if isinstance(data.sampler, DistributedSampler):
        data.sampler.set_epoch(zlib.crc32(stage.encode()) % 100_000 * 1_000 + epoch)


@contextmanager
def session(device: torch.device) -> Iterator[tuple[Ranks, torch.device]]:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) for the duration; leave it after.

    Yields this process's ranks and its device (``cuda:LOCAL_RANK`` for CUDA).
    """
    if dist.is_initialized():  # the caller made the group (library use): join it, leave it to them
        ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), enabled=True)
        yield ranks, ranks.device(device)
        return
    if not under_torchrun():
        yield Ranks(), device
        return
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")), enabled=True)
    device = ranks.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank, world_size=ranks.world_size)
    except (RuntimeError, ValueError) as exc:
        raise RapcError(f"cannot join torchrun's process group ({str(exc).splitlines()[0]}); check MASTER_ADDR and MASTER_PORT") from None
    try:
        yield ranks, device
    finally:
        # After a run the model DDP wrapped sits in reference cycles, and with it what DDP attached to
        # it, which holds the process group. Freed only at interpreter shutdown, gloo then sometimes
        # aborted the process ("terminate called without an active exception"); collected now, it is not.
        # The ranks also leave together: rank 0 alone shrinks and evaluates at the end, and a rank that
        # tore its side of the group down meanwhile was seen to abort the same way.
        gc.collect()
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()

