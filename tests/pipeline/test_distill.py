import copy

import torch

from rapc.config import DistillConfig, OptimizerConfig, ScheduleConfig
from rapc.data import loader
from rapc.models import create_model
from rapc.pipeline.distill import distillation
from rapc.pipeline.loop import Hooks, Step, make_optimizer, make_schedule, train_epoch


def _fresh_lenet(digits_cfg, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet", num_classes=10, in_channels=1, image_size=8, width=4, mean=[0.5], std=[0.5])


def _kl(teacher, student, x, temperature=1.0) -> float:
    with torch.no_grad():
        term = distillation(teacher, DistillConfig(weight=1.0, temperature=temperature))
        return float(term(x, student(x)))


def test_the_term_is_zero_against_itself_and_positive_against_another_model(trained_lenet, digits_batch):
    x, _ = digits_batch
    assert distillation(trained_lenet, DistillConfig(weight=0.0)) is None  # off
    assert abs(_kl(trained_lenet, trained_lenet.eval(), x)) < 1e-6
    other = _fresh_lenet(None, seed=7).eval()
    assert _kl(trained_lenet, other, x) > 0.1


def test_gradients_reach_the_student_only_and_the_teacher_stays_frozen_in_eval_mode(trained_lenet, digits_batch):
    x, _ = digits_batch
    teacher = copy.deepcopy(trained_lenet).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _fresh_lenet(None, seed=3)
    term = distillation(teacher, DistillConfig(weight=2.0, temperature=4.0))
    assert not teacher.training
    term(x, student(x)).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.dim() > 1)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


class _Shifted(torch.nn.Module):
    """A teacher that is sure of the wrong class: the trained model's logits rolled by one class."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(self.model(x), 1, dims=1)


def test_training_with_the_term_follows_the_teacher_where_it_disagrees_with_the_labels(trained_lenet, digits):
    """The loop really adds the hook's term, in the right direction: taught by a teacher that predicts
    the next class, a student trained with a heavy distillation weight agrees with that teacher on
    unseen images, and one trained on the labels alone does not."""
    teacher = _Shifted(trained_lenet)
    test_x = torch.cat([x for x, _ in loader(digits.test, 360, shuffle=False)])
    data = loader(digits.train, 64, shuffle=True)
    agreement = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(11)
        student = _fresh_lenet(None, seed=11)
        optimizer = make_optimizer(student.parameters(), OptimizerConfig(name="adam", lr=3e-3))
        schedule = make_schedule(optimizer, ScheduleConfig(name="constant"), len(data), 4)
        hooks = Hooks(loss=distillation(teacher, DistillConfig(weight=weight, temperature=1.0)))
        for _ in range(4):
            train_epoch(student, data, Step(optimizer, schedule, hooks=hooks))
        with torch.no_grad():
            agreement[weight] = float((student.eval()(test_x).argmax(1) == teacher(test_x).argmax(1)).float().mean())
    assert agreement[0.0] < 0.1 and agreement[5.0] > 0.6, agreement
