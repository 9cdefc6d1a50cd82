"""The in-memory dataset types and the registry of dataset names.

`ImageDataset` / `DatasetSplits` are what `load_dataset` returns; `DataSource` is what each format reader (`idx`,
`cifar`, `imagefolder`) hands to `loading.load_dataset`: the files to fingerprint for the cache and a reader to call
on a cache miss. The registry (names, aliases, the known datasets' classes and statistics) lives here so that the
readers and the loader share one copy without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ecavg.errors import DataError

IMAGEFOLDER_PREFIX = "imagefolder:"
DATASET_NAMES: list[str] = ["mnist", "fashion-mnist", "cifar10", "cifar100", "mnist-sample"]

_NAME_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "mnist_sample": "mnist-sample",
}


@dataclass
class ImageDataset:
    """Images kept in memory as uint8 [N, C, H, W] with int64 labels [N]; never decoded again."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"ImageDataset.images must be a uint8 tensor [N, C, H, W], got "
                f"{getattr(self.images, 'dtype', type(self.images))} {tuple(getattr(self.images, 'shape', ()))}"
            )
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(
                f"ImageDataset.labels must be an int64 tensor [N], got "
                f"{getattr(self.labels, 'dtype', type(self.labels))} {tuple(getattr(self.labels, 'shape', ()))}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(
                f"ImageDataset has {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        self.classes = list(self.classes)
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DataError(
                f"ImageDataset labels span [{int(self.labels.min())}, {int(self.labels.max())}] "
                f"but there are {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        """A new dataset holding copies of the samples at `indices` (any integer tensor or sequence)."""
        index = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device).reshape(-1)
        if index.numel() and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise IndexError(
                f"subset indices span [{int(index.min())}, {int(index.max())}] but the dataset has {len(self)} samples"
            )
        return ImageDataset(self.images[index], self.labels[index], list(self.classes))

    def random_subset(self, count: int, seed: int) -> ImageDataset:
        """``count`` samples drawn without replacement by a generator seeded with ``seed``, kept in their order."""
        generator = torch.Generator().manual_seed(seed)
        return self.subset(torch.randperm(len(self), generator=generator)[:count].sort().values)


@dataclass
class DatasetSplits:
    name: str
    train: ImageDataset
    test: ImageDataset
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]


@dataclass
class DataSource:
    """Where a dataset's files are, found without decoding them."""

    kind: str  # idx | cifar-folder | cifar-archive | imagefolder-dir | imagefolder-zip (part of the cache key)
    files: list[Path]  # what the cache key fingerprints
    read: Callable[[], tuple[ImageDataset, ImageDataset]]
    description: str  # for messages


def check_label_range(labels: torch.Tensor, num_classes: int, path: Path | str) -> None:
    """DataError naming `path` if a label is outside [0, num_classes)."""
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{path}: labels span [{low}, {high}] but there are {num_classes} classes")


# --------------------------------------------------------------------------------------------
# The known datasets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownDataset:
    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None  # None: take them from the files


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))

# Per-channel statistics of the official training sets on the [0, 1] scale.
KNOWN_DATASETS: dict[str, KnownDataset] = {
    "mnist": KnownDataset(10, 1, (0.1307,), (0.3081,), DIGIT_CLASSES),
    "mnist-sample": KnownDataset(10, 1, (0.1307,), (0.3081,), DIGIT_CLASSES),
    "fashion-mnist": KnownDataset(10, 1, (0.2860,), (0.3530,), FASHION_MNIST_CLASSES),
    "cifar10": KnownDataset(10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10_CLASSES),
    "cifar100": KnownDataset(100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), None),
}


def known_class_names(name: str) -> list[str] | None:
    """The standard class names of a known dataset; None if unknown or taken from its files."""
    known = KNOWN_DATASETS.get(name)
    return list(known.classes) if known is not None and known.classes else None


def canonical_dataset_name(name: str) -> str:
    """One of DATASET_NAMES (aliases and case folded), or `imagefolder:<absolute path>`."""
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"dataset name must be a non-empty string, got {name!r}")
    stripped = name.strip()
    if stripped.lower().startswith(IMAGEFOLDER_PREFIX):
        path = stripped[len(IMAGEFOLDER_PREFIX):]
        if not path:
            raise DataError("dataset name 'imagefolder:' needs a path, e.g. imagefolder:/data/pets.zip")
        return IMAGEFOLDER_PREFIX + str(Path(path).expanduser().resolve())
    lowered = stripped.lower()
    lowered = _NAME_ALIASES.get(lowered, lowered)
    if lowered not in DATASET_NAMES:
        raise DataError(
            f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}, or imagefolder:<dir or .zip>"
        )
    return lowered
