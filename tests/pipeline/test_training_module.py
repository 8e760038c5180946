"""The config's speed switches build a module that trains; names and files stay those of the plain model."""

import pytest
import torch

from rapc.config import AttackConfig
from rapc.data import loader
from rapc.modelio import Architecture
from rapc.pipeline.distributed import Ranks
from rapc.pipeline.loop import Step, make_optimizer, make_schedule, train_epoch
from rapc.pipeline.training_module import training_module


def _one_step(cfg, digits, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = Architecture.for_data(cfg.model, digits.info).build().to(device)
    module = training_module(model, cfg, device, Ranks())
    optimizer = make_optimizer(model.parameters(), cfg.stages.pretrain.optimizer)
    batch = [next(iter(loader(digits.train, 32, shuffle=False)))]
    stats = train_epoch(module, batch, Step(optimizer, make_schedule(optimizer, cfg.stages.pretrain.schedule, 1, 1),
                                            AttackConfig(eps=0.1, steps=2, step=0.05), cfg.precision))
    return model, module, stats


def test_channels_last_trains_with_nhwc_weights_and_unchanged_names(digits_cfg, digits):
    cfg = digits_cfg.model_copy(update={"channels_last": True}, deep=True)
    model, module, stats = _one_step(cfg, digits, torch.device("cpu"))
    assert module is model and model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert stats["loss"] > 0 and "conv1.weight" in model.state_dict()


def test_compile_wraps_the_model_and_keeps_its_parameters(digits_cfg, digits):
    cfg = digits_cfg.model_copy(update={"compile": True}, deep=True)
    model, module, stats = _one_step(cfg, digits, torch.device("cpu"))
    assert module is not model and module._orig_mod is model
    assert stats["loss"] > 0 and list(dict(module.named_parameters())) != list(dict(model.named_parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_channels_last_and_cudnn_benchmark_train_on_the_gpu(digits_cfg, digits):
    cfg = digits_cfg.model_copy(update={"precision": "bf16", "channels_last": True, "cudnn_benchmark": True}, deep=True)
    model, _, stats = _one_step(cfg, digits, torch.device("cuda"))
    assert torch.backends.cudnn.benchmark and model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert stats["loss"] == stats["loss"] and stats["loss"] > 0
