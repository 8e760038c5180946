import pytest
import torch

from rapc.config import DataConfig
from rapc.data import load_data, random_splits
from rapc.errors import RapcError


def test_mnist5k_is_the_embedded_real_mnist_with_a_fixed_test_split():
    splits = load_data(DataConfig(name="mnist5k", val_fraction=0.1), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3600, 400, 1000)
    x, y = splits.test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    labels = torch.stack([splits.test[i][1] for i in range(len(splits.test))])
    assert labels.bincount().min() > 70  # all ten digits, roughly balanced
    other_seed = load_data(DataConfig(name="mnist5k", val_fraction=0.1), seed=1)
    assert torch.equal(other_seed.test.tensors[0], splits.test.tensors[0])  # the test split never moves
    assert not torch.equal(other_seed.val.tensors[0], splits.val.tensors[0])  # validation is carved per seed


def test_validation_is_disjoint_from_training_and_test():
    splits = load_data(DataConfig(name="digits", val_fraction=0.2), seed=0)
    flat = lambda ds: {tuple(row.tolist()) for row in ds.tensors[0].flatten(1)}  # noqa: E731
    train, val, test = flat(splits.train), flat(splits.val), flat(splits.test)
    assert len(val) > 200 and not (val & test) and len(train & val) <= 5  # digits has a few duplicate images


def test_missing_torchvision_files_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(RapcError, match="dataset files not found.*data.download=true"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path), download=False), seed=0)


def test_imagefolder_needs_train_and_test_folders(tmp_path):
    with pytest.raises(RapcError, match="train"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path)), seed=0)


def test_imagefolder_loads_class_folders(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("L", (40, 20), color=40 * i).save(folder / f"{i}.png")
    splits = load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_fraction=0.2), seed=0)
    x, y = splits.test[0]
    assert x.shape == (3, 32, 32) and splits.info.num_classes == 2 and isinstance(y, int)


def test_imagefolder_reads_the_size_and_channels_asked_for_and_flips_only_when_asked(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        folder = tmp_path / split / "arrow"
        folder.mkdir(parents=True)
        image = Image.new("RGB", (12, 12), color=(200, 100, 0))
        image.paste((0, 0, 0), (0, 0, 6, 12))  # left half black: a flip moves it right
        image.save(folder / "0.png")
        image.save(folder / "1.png")
    gray = load_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=12, channels=1, hflip=False, val_fraction=0.5), 0)
    x, _ = gray.test[0]
    assert x.shape == (1, 12, 12) and (gray.info.channels, gray.info.image_size) == (1, 12) and len(gray.info.mean) == 1
    assert float(x[0, :, :6].max()) == 0.0 and float(x[0, :, 6:].min()) > 0.3
    assert all(torch.equal(gray.train[0][0], x) for _ in range(20))  # never flipped
    flipping = load_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=12, val_fraction=0.5), 0)
    assert flipping.train[0][0].shape == (3, 12, 12)
    assert any(float(flipping.train[0][0][0, :, :6].min()) > 0.3 for _ in range(40))  # flipped now and then


@pytest.mark.parametrize("option", [{"image_size": 16}, {"channels": 1}, {"hflip": False}])
def test_image_options_are_refused_for_a_dataset_with_its_own_shapes(option):
    with pytest.raises(ValueError, match="imagefolder only"):
        DataConfig(name="mnist5k", **option)


def test_random_splits_are_pixels_in_0_1_with_labels_below_num_classes():
    splits = random_splits((3, 8, 8), 100, num_classes=5)
    images, labels = splits.train.tensors
    assert images.shape == (100, 3, 8, 8) and 0 <= images.min() and images.max() <= 1 and 0 <= labels.min() and labels.max() < 5
    assert len(splits.val) == len(splits.test) == 256 and (splits.info.channels, splits.info.image_size) == (3, 8)
    with pytest.raises(RapcError, match="square"):
        random_splits((3, 8, 6), 10)


def test_the_random_dataset_has_cifar_shapes_and_is_reproducible():
    from rapc.config import DataConfig

    a, b = load_data(DataConfig(name="random"), seed=1), load_data(DataConfig(name="random"), seed=1)
    x, y = a.train[0]
    assert x.shape == (3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1 and a.info.num_classes == 10
    assert torch.equal(x, b.train[0][0]) and int(y) == int(b.train[0][1])


def test_a_head_of_an_imagefolder_test_split_samples_every_class_in_a_fixed_order(tmp_path):
    """An image folder lists its test images class by class: the first n images an evaluation takes
    (eval.n_ensemble, bench --n-eval) must not be the first classes only, and must be the same every run."""
    from PIL import Image

    from rapc.data import head

    classes = [f"c{k}" for k in range(5)]
    for split in ("train", "test"):
        for k, label in enumerate(classes):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(20):
                Image.new("L", (8, 8), color=10 * k + i).save(folder / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), val_fraction=0.2)
    labels = [[y for _, y in head(load_data(cfg, seed=s).test, 25)] for s in (0, 1)]
    assert set(labels[0]) == set(range(5))  # in folder order the first 25 would be classes 0 and 1 only
    assert labels[0] == labels[1]  # fixed, independent of the run seed
