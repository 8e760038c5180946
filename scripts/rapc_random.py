"""`rapc` with a `random` dataset: CIFAR-10 shapes (3x32x32, 10 classes), uniform pixels, random labels.

The GPU check measures whether and how fast the pipeline runs on a GPU, which does not depend on
the pixels, and the GPU machines have no network to fetch CIFAR-10. Where rapc registers a
`random` dataset itself, that one is used; otherwise this registers one from rapc.data's
random_splits (the benchmark's random images). Same arguments as `rapc`:

    python scripts/rapc_random.py compress -c cifar10-resnet18-filter --set data.name=random ...

RAPC_RANDOM_TRAIN sets the number of training images (default 1280: 10 steps of 128).
"""

from __future__ import annotations

import os
import sys


def _register_random() -> None:
    try:
        from rapc.data import DATASETS, random_splits
    except ImportError as exc:
        sys.exit(f"error: this rapc has no random dataset and no rapc.data.random_splits to make one ({exc})")
    if "random" in DATASETS:
        return
    n_train = int(os.environ.get("RAPC_RANDOM_TRAIN", "1280"))

    @DATASETS.register("random")
    def random(cfg, seed: int):  # noqa: ANN001 - rapc's dataset builder signature
        return random_splits((3, 32, 32), n_train, num_classes=10, seed=seed)


if __name__ == "__main__":
    _register_random()
    from rapc.cli import main

    main(prog_name="rapc")
