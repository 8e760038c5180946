"""How much of the final judge's wall time its attacks spend in the model's forward and backward
passes, per part, measured in one run; and a checksum of its per-image verdicts.

What is measured: ``judge.final_protocol`` of a run's ``attack.eval`` (clean, FGSM, PGD with
restarts, and the ensemble PGD + APGD-CE + APGD-T at 100 steps and 9 targets) through
``judge.judge_loader``, on the run's model (``--model``, default the compressed one) and the first
``--n`` test images of its dataset, in batches of its ``data.eval_batch_size`` (``--batch``). Without
``--run``, a short compress run of the ``digits-lenet-filter`` preset is made first (under ``--out``).

- Wall time: the whole ``judge_loader`` call, and per part (FGSM, PGD, APGD-CE, APGD-T, the rest:
  clean predictions, the zero-gradient check, re-predictions, glue), from wrappers around
  ``rapc.judge.attack_batch`` and torchattacks' ``APGD.forward`` and ``APGDT.forward``.
- Model time: forward passes timed by a forward pre-hook and hook on the model (no_grad ones
  included), backward passes by a wrapper around ``torch.autograd.grad``, which every attack calls.
  The fraction is model time / wall time; the rest is overhead the attacks do not need.
- A cross-check: the same passes replayed bare (a random batch of each size seen, forward and, where
  the judge took a gradient, cross-entropy and ``torch.autograd.grad`` to the input; ``--replay``
  passes per size, the median times the count).
- Verdicts: the accuracy and a SHA-256 of the per-image correct/incorrect flags of every attack, so
  two runs (code before and after a change) show that they judged every image alike.

Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_profile.py --run runs/mnist-lenet-filter --n 500
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_profile.py   # a short digits run first

Measured figures, each with its command, machine and date: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

import rapc.judge as judge
from rapc.bench.run import machine
from rapc.config import load_config
from rapc.data import head, load_data, loader
from rapc.modelio import load_model
from rapc.rundir import open_run

OTHER = "rest"
PARTS = ("FGSM", "PGD", "APGD-CE", "APGD-T", OTHER)


class PassTimer:
    """Seconds of wall time, forward passes and backward passes per part of the judge, while active."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
        self.part = OTHER
        self.wall: Counter[str] = Counter()
        self.forward: Counter[str] = Counter()
        self.backward: Counter[str] = Counter()
        self.passes: Counter[tuple[str, int, bool]] = Counter()  # (part, batch size, input needs a gradient) -> count
        self._started: list[float] = []

    def _in_part(self, name: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            outer, self.part = self.part, name(*args, **kwargs) if callable(name) else name
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                seconds = time.perf_counter() - start
                self.wall[self.part] += seconds
                self.wall[outer] -= seconds  # a part's time is not its caller's
                self.part = outer
        return wrapped

    def _grad(self, grad: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            out = grad(*args, **kwargs)
            self.sync()
            self.backward[self.part] += time.perf_counter() - start
            return out
        return timed

    def _before(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.sync()
        self._started.append(time.perf_counter())

    def _after(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.sync()
        self.forward[self.part] += time.perf_counter() - self._started.pop()
        self.passes[(self.part, len(inputs[0]), inputs[0].requires_grad)] += 1

    @contextmanager
    def active(self) -> Iterator[None]:
        patches = [
            (judge, "attack_batch", self._in_part(lambda m, x, y, attack, **kw: "FGSM" if attack.method == "fgsm" else "PGD",
                                                  judge.attack_batch)),
            (torchattacks.APGD, "forward", self._in_part("APGD-CE", torchattacks.APGD.forward)),
            (torchattacks.APGDT, "forward", self._in_part("APGD-T", torchattacks.APGDT.forward)),
            (torch.autograd, "grad", self._grad(torch.autograd.grad)),
        ]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        hooks = [self.model.register_forward_pre_hook(self._before), self.model.register_forward_hook(self._after)]
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        try:
            yield
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)
            for hook in hooks:
                hook.remove()


def bare_seconds(model: nn.Module, passes: Counter[tuple[str, int, bool]], shape: tuple[int, ...], n_classes: int,
                 repeats: int) -> Counter[str]:
    """The same passes replayed bare: per batch size, the median of ``repeats`` passes times the count."""
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    device = next(model.parameters()).device
    median: dict[tuple[int, bool], float] = {}
    for size, with_grad in sorted({(size, g) for _, size, g in passes}):
        x = torch.rand(size, *shape, device=device)
        y = torch.randint(n_classes, (size,), device=device)
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            if with_grad:
                x.requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
            else:
                with torch.no_grad():
                    model(x)
            sync()
            times.append(time.perf_counter() - start)
        median[(size, with_grad)] = statistics.median(times)
    out: Counter[str] = Counter()
    for (part, size, with_grad), count in passes.items():
        out[part] += count * median[(size, with_grad)]
    return out


def checksum(correct: torch.Tensor) -> str:
    return hashlib.sha256(correct.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def digits_run(out: Path) -> Path:
    """A short compress run of the digits preset: a small, somewhat robust LeNet in about a minute."""
    from rapc.pipeline.compress import compress

    cfg = load_config("digits-lenet-filter")
    cfg.stages.pretrain.epochs, cfg.stages.admm.epochs, cfg.stages.retrain.epochs = 4, 2, 1
    cfg.stages.dense_control = False
    print(f"no --run: a short compress run of digits-lenet-filter in {out}", flush=True)
    return compress(cfg, out).run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished rapc compress run directory (default: a short digits run)")
    parser.add_argument("--model", default="compressed", choices=("compressed", "dense"), help="which of the run's models")
    parser.add_argument("--n", type=int, default=200, help="test images (the first n); the ensemble attacks all of them")
    parser.add_argument("--n-ensemble", type=int, default=None, help="the ensemble on the first n of them (default: all)")
    parser.add_argument("--batch", type=int, default=None, help="loader batch (default: the run's data.eval_batch_size)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as torch starts)")
    parser.add_argument("--replay", type=int, default=3, help="bare passes per batch size for the cross-check (0: none)")
    parser.add_argument("--out", type=Path, default=None, help="where the digits run goes without --run (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures and per-image verdicts here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    run = open_run(args.run or digits_run((args.out or Path(tempfile.mkdtemp(prefix="judge-profile-"))) / "digits"))
    cfg = run.config()
    model = load_model(run.models()[args.model]).eval()
    splits = load_data(cfg.data, cfg.seed)
    test = loader(head(splits.test, args.n), args.batch or cfg.data.eval_batch_size, shuffle=False)
    protocol = judge.final_protocol(cfg.attack.eval, n_ensemble=args.n_ensemble, seed=cfg.seed)

    info = machine()
    print(f"{info['platform']}, {info['cpu_count']} CPUs, torch {info['versions'].get('torch')} with "
          f"{torch.get_num_threads()} threads, torchattacks {info['versions'].get('torchattacks')}, "
          f"{info.get('gpu') or 'no GPU'}")
    print(f"judge: {run.root} {args.model}, {cfg.model.name} on {cfg.data.name}, first {len(test.dataset)} test images in "
          f"batches of {test.batch_size}; {protocol.ensemble_label(splits.info.num_classes)} on "
          f"{args.n_ensemble or 'all'}")

    timer = PassTimer(model)
    with timer.active():
        start = time.perf_counter()
        verdict = judge.judge_loader(model, test, protocol, n_classes=splits.info.num_classes)
        wall = time.perf_counter() - start
    timer.wall[OTHER] += wall  # the rest: wall time outside every part
    shape = tuple(splits.test[0][0].shape)
    bare = bare_seconds(model, timer.passes, shape, splits.info.num_classes, args.replay) if args.replay else Counter()

    header = f"{'part':<8} {'wall s':>8} {'fwd s':>8} {'bwd s':>8} {'model/wall':>10} {'bare/wall':>9} {'passes':>7} {'grads':>6} {'images':>8}"
    print(header)
    rows = {}
    for part in [*PARTS, "total"]:
        keys = PARTS if part == "total" else (part,)
        w = sum(timer.wall[k] for k in keys)
        fwd, bwd = sum(timer.forward[k] for k in keys), sum(timer.backward[k] for k in keys)
        b = sum(bare[k] for k in keys)
        passes = sum(c for (p, _, _), c in timer.passes.items() if p in keys)
        grads = sum(c for (p, _, g), c in timer.passes.items() if p in keys and g)
        images = sum(c * s for (p, s, _), c in timer.passes.items() if p in keys)
        rows[part] = {"wall_s": w, "forward_s": fwd, "backward_s": bwd, "bare_s": b, "passes": passes, "grads": grads,
                      "images": images}
        ratio = f"{(fwd + bwd) / w:10.1%}" if w > 0 else f"{'-':>10}"
        bare_ratio = f"{b / w:9.1%}" if w > 0 and args.replay else f"{'-':>9}"
        print(f"{part:<8} {w:8.2f} {fwd:8.2f} {bwd:8.2f} {ratio} {bare_ratio} {passes:7d} {grads:6d} {images:8d}")
    total = rows["total"]
    print(f"fraction (model forward+backward / judge wall time): {(total['forward_s'] + total['backward_s']) / wall:.1%} "
          f"of {wall:.2f} s wall" + (f"; bare replay of the same passes: {total['bare_s'] / wall:.1%}" if args.replay else ""))
    sums = {}
    for r in verdict.results:
        sums[r.name] = checksum(r.correct)
        print(f"verdicts {r.name:<8} {r.accuracy:7.2%} n={r.n:<5} sha256 {sums[r.name]}")
    overall = checksum(torch.cat([r.correct for r in verdict.results]))
    print(f"verdicts all: sha256 {overall}; zero gradients {verdict.zero_gradients}; broken by {verdict.robust.details}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "wall_s": wall, "parts": rows, "checksum": overall, "verdict": verdict.to_dict(),
            "correct": {r.name: r.correct.int().tolist() for r in verdict.results}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
