"""What a stage checkpoint gives back to each rank of a resumed torchrun (the collectives of saving
are exercised by the torchrun runs of test_resume.py)."""

import torch

from rapc.pipeline.checkpoint import StageState
from rapc.pipeline.distributed import Ranks
from rapc.pipeline.loop import EpochTotals


def _state(ranks: Ranks) -> StageState:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return StageState(model, optimizer, schedule, None, None, None, torch.Generator().get_state(), ranks=ranks)


def _rank(rank: int) -> Ranks:
    """A rank of two, resuming: loading a checkpoint takes no collective, so no process group is needed."""
    return Ranks(rank, 2, rank, enabled=True)


def _saved() -> dict:
    """A checkpoint written by one process, inside an epoch: its generators and sums are rank 0's."""
    torch.manual_seed(7)
    state = _state(Ranks())
    state.totals = EpochTotals(torch.tensor(12.5), torch.tensor(3), seen=8, steps=4)
    return state.state_dict()


def test_rank_0_takes_its_saved_generators_and_the_summed_figures_of_the_epoch():
    saved = _saved()
    expected = torch.rand(3)
    state = _state(_rank(0))
    state.load_state_dict(saved)
    state.restore_rng(seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert state.totals.read() == {"loss": 12.5 / 8, "acc": 3 / 8} and state.totals.steps == 4


def test_a_rank_the_checkpoint_has_no_generators_for_is_seeded_as_at_the_start_and_counts_from_zero():
    saved = _saved()
    state = _state(_rank(1))
    state.load_state_dict(saved)
    state.restore_rng(seed=5)
    assert torch.initial_seed() == 6
    assert (state.totals.seen, state.totals.steps, float(state.totals.loss)) == (0, 4, 0.0)
