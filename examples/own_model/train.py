"""The user's own adversarial training, outside rapc: FGSM from a random start (Wong et al. 2020).

Reads the folder with torchvision's ImageFolder the way rapc's `imagefolder` does (RGB, 32x32,
pixels in [0,1], random horizontal flips for training), attacks in pixel space, normalizes just
before the network, and saves the state dict as a DataParallel-wrapped model would (`module.`
prefix; rapc strips it).

    python examples/own_model/train.py runs/own-model-data --out runs/own-model-data/robust.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).parent))
from mynets import MEAN, STD, small_cnn  # noqa: E402


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)


def fgsm_rs(net, x, y, eps):
    """FGSM from a uniform random start in the eps-ball, step 1.25*eps, in [0,1] pixels."""
    delta = ((torch.rand_like(x) * 2 - 1) * eps).requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(net(normalize((x + delta).clamp(0, 1))), y), delta)
    return (x + (delta + 1.25 * eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1).detach()


def pgd(net, x, y, eps, steps=10):
    """PGD-10 from a random start, step 2.5*eps/steps: a quick robustness check, not rapc's judge."""
    adv = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(net(normalize(adv)), y), adv)
        adv = torch.min(torch.max(adv.detach() + 2.5 * eps / steps * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return adv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the imagefolder root (train/ and test/)")
    parser.add_argument("--out", type=Path, default=Path("robust.pt"))
    parser.add_argument("--eps", type=float, default=0.2, help="L-inf radius in [0,1] pixels (config.yaml's attack eps)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--channels", type=int, default=16, help="small_cnn's width (a config with another sets model.kwargs.channels)")
    parser.add_argument("--clean-epochs", type=int, default=1, help="leading epochs on clean images (FGSM training starts better)")
    args = parser.parse_args()

    torch.manual_seed(0)
    size = transforms.Resize((32, 32))
    train = datasets.ImageFolder(args.folder / "train", transforms.Compose([size, transforms.RandomHorizontalFlip(), transforms.ToTensor()]))
    test = datasets.ImageFolder(args.folder / "test", transforms.Compose([size, transforms.ToTensor()]))
    net = small_cnn(num_classes=len(train.classes), in_channels=3, channels=args.channels)
    optimizer = torch.optim.Adam(net.parameters())  # its learning rate set by the one-cycle schedule
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=args.epochs * len(DataLoader(train, 64)))
    for epoch in range(args.epochs):
        start, net = time.perf_counter(), net.train()
        adversarial, losses = epoch >= args.clean_epochs, []
        for x, y in DataLoader(train, batch_size=64, shuffle=True):
            if adversarial:
                x = fgsm_rs(net, x, y, args.eps)
            loss = F.cross_entropy(net(normalize(x)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        net.eval()
        x, y = next(iter(DataLoader(test, batch_size=len(test))))
        with torch.no_grad():
            clean = (net(normalize(x)).argmax(1) == y).float().mean()
        robust = (net(normalize(pgd(net, x, y, args.eps))).argmax(1) == y).float().mean()
        print(f"epoch {epoch + 1}/{args.epochs} ({'FGSM-RS' if adversarial else 'clean'}, {time.perf_counter() - start:.0f} s): "
              f"train loss {sum(losses) / len(losses):.3f}; test: clean {clean:.1%}, PGD-10 eps {args.eps:g} {robust:.1%} (n={len(y)})")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.nn.DataParallel(net).state_dict(), args.out)  # keys `module.features.0.0.weight` ...
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
