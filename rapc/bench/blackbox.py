"""Square through a runner: the black-box half of the judge, run on the file that ships.

The judge runs torchattacks' Square on the PyTorch model (level ``full``). Here the same attack,
at the same settings and seed (``rapc.judge.square_attack``), attacks a ``Runner``: an ONNX file
in onnxruntime, a TensorRT engine, or PyTorch itself. ``RunnerModel`` wraps the runner as a module
whose forward is ``runner.infer``, so Square sees nothing but the logits the runtime returns: no
gradient exists to mislead it, and an fp16 or int8 file is attacked as it computes, not through
the fp32 model it came from.

Only images the runtime classifies correctly clean are attacked, and torchattacks' Square queries
only the images it has not broken yet (its loop indexes ``margin > 0``), so a robust image costs
up to ``queries`` forward passes and a broken one stops there.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from rapc.export.runners import Runner
from rapc.judge import SQUARE_QUERIES, AttackResult, square_attack

MAX_BATCH = 256  # rows per runner call: engines are built for batches up to `rapc export --max-batch` (default 256)


class RunnerModel(nn.Module):
    """A runner as an ``nn.Module`` for torchattacks: images (float, pixels in [0, 1], any device)
    in, float32 logits on the CPU out; gradients never flow through it."""

    def __init__(self, runner: Runner, max_batch: int = MAX_BATCH) -> None:
        super().__init__()
        self.runner, self.max_batch = runner, max_batch
        # torchattacks reads the attack's device from the first parameter: an empty one says "cpu",
        # where the queries are made, instead of the print it gives a module without parameters.
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.queries = 0  # images sent to the runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().cpu().numpy().astype(np.float32, copy=False)
        self.queries += len(batch)
        logits = [self.runner.infer(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        return torch.from_numpy(np.concatenate(logits).astype(np.float32, copy=False))


def square_label(queries: int, artifact: str, runtime: str, precision: str) -> str:
    """``Square-5000 on compressed.int8.onnx (onnxruntime CPU, int8)``"""
    return f"Square-{queries} on {artifact} ({runtime}, {precision})"


def square(runner: Runner, images: torch.Tensor, labels: torch.Tensor, eps: float, *, artifact: str, precision: str,
           queries: int = SQUARE_QUERIES, seed: int = 0, batch: int = 256) -> AttackResult:
    """Square (L-inf, ``eps`` in pixel units) on what ``runner`` serves, in batches of ``batch`` images.

    Per image: correct on the clean image and on Square's. Each batch draws from ``seed``, as the
    judge's Square does; the caller's random generators are left as they were. ``details`` holds
    the images Square broke (``square``) and the runner's rows it was sent (``queries``).
    """
    model = RunnerModel(runner)
    correct = torch.zeros(len(labels), dtype=torch.bool)
    adversarial = images.detach().cpu().clone()
    labels = labels.cpu()
    broken = 0
    start = time.perf_counter()
    # torchattacks' Square reseeds the global generators (CPU and CUDA): fork them.
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        for first in range(0, len(labels), batch):
            x, y = adversarial[first : first + batch].clone(), labels[first : first + batch]
            ok = model(x).argmax(1) == y
            alive = ok.nonzero().squeeze(1)
            if alive.numel():
                found = square_attack(model, eps, seed, queries)(x[alive], y[alive]).detach().cpu()
                adversarial[first + alive] = found
                ok[alive] = model(found).argmax(1) == y[alive]
                broken += int(alive.numel() - ok[alive].sum())
            correct[first : first + batch] = ok
    return AttackResult("square", square_label(queries, artifact, runner.runtime, precision), correct, adversarial,
                        time.perf_counter() - start, {"square": broken, "queries": model.queries})


def unresponsive(runner: Runner, images: torch.Tensor, survived: torch.Tensor, eps: float, seed: int = 0) -> int:
    """Images that survived Square whose logits are bit-identical on a copy moved by ``eps`` in a
    random direction at every pixel: the black-box counterpart of the judge's all-zero input
    gradients. A runtime whose outputs do not respond to its input gives a score-based attack
    nothing to follow, so surviving it is no evidence of robustness."""
    index = survived.nonzero().squeeze(1)
    if index.numel() == 0:
        return 0
    x = images[index].detach().cpu().float()
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, x.shape, generator=generator).float() * 2 - 1
    model = RunnerModel(runner)
    with torch.no_grad():
        return int((model(x) == model((x + eps * signs).clamp(0, 1))).all(1).sum())
