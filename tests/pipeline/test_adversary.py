"""Carried perturbations and free adversarial training, on real digits and a real LeNet."""

import pytest
import torch
import torch.nn.functional as F

from rapc.attacks import robust_correct
from rapc.config import AttackConfig, TrainAttackConfig, load_config
from rapc.data import Splits, loader
from rapc.errors import RapcError
from rapc.modelio import Architecture
from rapc.pipeline.adversary import LEVELS, Indexed, PerturbationStore, adversarial_inputs
from rapc.pipeline.distributed import Ranks, ShardSampler
from rapc.pipeline.loop import Step, make_optimizer, make_schedule, train_epoch
from rapc.pipeline.trainer import RunData

EPS = 0.1


def _lenet(digits: Splits, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = load_config("digits-lenet-filter")
    return Architecture.for_data(cfg.model, digits.info).build()


def _epoch(model, data, attack, store=None, epochs: int = 1):
    optimizer = make_optimizer(model.parameters(), load_config("digits-lenet-filter").stages.pretrain.optimizer)
    replays = attack.steps if attack.method == "free" else 1
    schedule = make_schedule(optimizer, load_config("digits-lenet-filter").stages.pretrain.schedule, len(data) * replays, epochs)
    for _ in range(epochs):
        stats = train_epoch(model, data, Step(optimizer, schedule, attack, store=store))
    return stats, schedule


def test_each_example_keeps_the_perturbation_its_last_attack_produced_within_eps_and_the_pixel_range(digits):
    """Training inputs are recorded by index (the training forward pass is the one whose input needs no
    gradient); after two shuffled epochs every example's stored perturbation is its last adversarial
    input minus its image, to the store's 8 bits, and never larger."""
    model, train = _lenet(digits), Indexed(digits.train)
    data = loader(train, 64, shuffle=True, seed=3)
    store = PerturbationStore.make(len(train), train[0][0].shape, EPS, torch.device("cpu"))
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()) if not args[0].requires_grad else None)
    indices = []
    for _ in range(2):
        generator_state = data.generator.get_state()
        indices += [batch for _, _, batch in data]  # the epoch's order, as the loop will draw it
        data.generator.set_state(generator_state)
        _epoch(model, data, TrainAttackConfig(eps=EPS, steps=2, carry=True), store)
    last = {int(i): x for batch, inputs in zip(indices, seen) for i, x in zip(batch, inputs)}
    assert len(last) == len(train) and bool(store.visited.all())
    images = torch.stack([train[i][0] for i in range(len(train))])
    for i, adversarial in last.items():
        actual, kept = adversarial - images[i], store.perturbation(i)
        assert (kept - actual).abs().max() < EPS / LEVELS + 1e-7
        assert bool(((kept.abs() <= actual.abs() + 1e-7)).all())  # truncated towards zero
    stored = torch.stack([store.perturbation(i) for i in range(len(train))])
    assert stored.abs().max() <= EPS and 0 <= (images + stored).min() and (images + stored).max() <= 1
    assert stored.abs().max() > EPS / 2  # the attacks did move the examples


def test_an_attack_starts_from_the_stored_perturbation_and_a_new_example_from_a_random_one(digits):
    train = Indexed(digits.train)
    x, _, index = next(iter(loader(train, 32, shuffle=False)))
    store = PerturbationStore.make(len(train), x.shape[1:], EPS, torch.device("cpu"))
    delta = torch.empty_like(x).uniform_(-EPS, EPS)
    store.keep(index[:16], delta[:16])
    start = store.start(index, x, EPS, random_start=True)
    assert torch.allclose(start[:16], delta[:16], atol=EPS / LEVELS)
    assert start[16:].abs().max() <= EPS and start[16:].std() > EPS / 4  # uniform draws for the unvisited
    assert store.start(index, x, EPS, random_start=False)[16:].abs().max() == 0


def test_free_training_takes_one_optimizer_step_per_replay_and_moves_the_perturbation_by_signed_steps(digits):
    model, train = _lenet(digits), Indexed(digits.train)
    data = loader(train, 64, shuffle=True, seed=0)
    attack = TrainAttackConfig(method="free", eps=EPS, steps=3)
    _, schedule = _epoch(model, data, attack)
    assert schedule.last_epoch == 3 * len(data)
    x, y, index = next(iter(data))
    replays = adversarial_inputs(model, x, y, index, attack)
    previous = None
    for inputs in replays:
        delta = inputs.detach() - x
        assert delta.abs().max() <= EPS + 1e-6 and 0 <= inputs.min() and inputs.max() <= 1
        if previous is not None:  # each replay is the last one's perturbation plus step * sign(gradient), clipped
            moved = (delta - previous).abs()
            assert bool((moved <= attack.step_size + 1e-6).all()) and moved.max() > 0
        F.cross_entropy(model(inputs), y).backward()
        previous = delta


@pytest.mark.parametrize("attack", [TrainAttackConfig(method="free", eps=EPS, steps=4),
                                    TrainAttackConfig(eps=EPS, steps=1, step=EPS / 2, carry=True)], ids=["free", "carry"])
def test_the_fast_recipes_make_a_model_more_robust_than_clean_training(digits, attack):
    data = loader(Indexed(digits.train), 64, shuffle=True, seed=0)
    x, y = next(iter(loader(digits.val, 400, shuffle=False)))
    judge = AttackConfig(eps=EPS, steps=10, restarts=1)
    store = PerturbationStore.make(len(data.dataset), x.shape[1:], EPS, torch.device("cpu")) if attack.carry else None
    robust, natural = _lenet(digits), _lenet(digits)
    _epoch(robust, data, attack, store, epochs=5)
    _epoch(natural, data, attack.model_copy(update={"method": "none"}), epochs=5)
    torch.manual_seed(0)
    held = float(robust_correct(robust.eval(), x, y, judge).float().mean())
    torch.manual_seed(0)
    natural_held = float(robust_correct(natural.eval(), x, y, judge).float().mean())
    assert held > natural_held + 0.2, (held, natural_held)


def test_a_cifar_sized_store_takes_a_byte_a_pixel():
    store = PerturbationStore.make(50_000, torch.Size([3, 32, 32]), 8 / 255, torch.device("cpu"))
    size = store.codes.numel() * store.codes.element_size() + store.visited.numel()
    assert size < 160e6


def test_a_store_saves_whole_and_loads_the_shard_of_each_rank():
    """Checkpoints hold the store by dataset index, so two processes resume what one saved."""
    one = PerturbationStore.make(10, torch.Size([1, 2, 2]), EPS, torch.device("cpu"))
    index = torch.arange(10)
    one.keep(index, torch.linspace(-EPS, EPS, 40).view(10, 1, 2, 2))
    saved = one.state_dict()
    for rank in (0, 1):
        shard = PerturbationStore.make(10, torch.Size([1, 2, 2]), EPS, torch.device("cpu"), Ranks(rank, 2))
        shard.load_state_dict(saved)
        assert len(shard.codes) == 5
        for i in range(rank, 10, 2):
            assert torch.equal(shard.perturbation(i), one.perturbation(i))


def test_the_shard_sampler_gives_each_rank_the_same_examples_every_epoch_in_a_new_order():
    dataset = list(range(11))
    shards = []
    for rank in (0, 1):
        sampler = ShardSampler(dataset, 2, rank, shuffle=True, seed=0)
        first = list(sampler)
        sampler.set_epoch(1)
        second = list(sampler)
        assert len(first) == len(second) == 6 and set(first) == set(second) and first != second
        assert all(i % 2 == rank for i in first)
        shards.append(set(first))
    assert shards[0] | shards[1] == set(dataset) and not shards[0] & shards[1]


def test_carry_refuses_a_training_set_with_random_flips_in_one_line(digits, digits_cfg):
    cfg = digits_cfg.model_copy(update={"attack": digits_cfg.attack.model_copy(update={"train": TrainAttackConfig(carry=True)})})
    flipped = Splits(digits.train, digits.val, digits.test, digits.info, augmented=True)
    with pytest.raises(RapcError, match="attack.train.carry keeps each training image's perturbation"):
        RunData.make(cfg, flipped, torch.device("cpu"))


def test_the_fast_recipes_are_watched_by_the_overfitting_guard():
    assert TrainAttackConfig(method="free").fast and TrainAttackConfig(carry=True).fast and TrainAttackConfig(method="fgsm").fast
    assert not TrainAttackConfig().fast and not TrainAttackConfig(method="none", carry=True).fast
