"""The baseline: ECAvg's training written the usual way, against which our trainer is measured.

torchvision ``ImageFolder`` over the extracted JPEG tree (``datasets.MNIST`` over the raw IDX files for MNIST),
PIL transforms per sample (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``),
``DataLoader(num_workers=2, shuffle=True)``, the model and each batch in ``channels_last`` where our trainer uses
it too, SGD (Nesterov momentum) with a OneCycle schedule, and the textbook loop.

The JPEG zips are extracted once into a cache folder (never under the read-only shared datasets folder).
"""

from __future__ import annotations

import gzip
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

ZIPS = {"cifar10": "cifar10/cifar10-jpeg.zip", "cifar100": "cifar100/cifar100-jpeg.zip"}
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_COMPLETE = ".extracted"


def extract_imagefolder(dataset: str, data_dir: Path, cache_dir: Path) -> Path:
    """The JPEG tree of ``dataset`` (cifar10, cifar100) extracted under ``cache_dir``; extracted once."""
    if dataset not in ZIPS:
        raise ValueError(f"no JPEG zip known for dataset {dataset!r}; known: {', '.join(ZIPS)}")
    zip_path = Path(data_dir) / ZIPS[dataset]
    if not zip_path.is_file():
        raise FileNotFoundError(f"plain baseline needs {zip_path}, which does not exist")
    stat = zip_path.stat()
    target = Path(cache_dir) / f"{dataset}-jpeg-{stat.st_size}"
    marker = target / _COMPLETE
    if marker.exists():
        return _tree_root(target)
    if target.exists():
        shutil.rmtree(target)  # an earlier extraction was interrupted
    target.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(target)
    marker.write_text(str(zip_path))
    return _tree_root(target)


def _tree_root(target: Path) -> Path:
    """The folder holding train/ and test/ (the zip may wrap them in one top-level folder)."""
    if (target / "train").is_dir():
        return target
    for child in sorted(target.iterdir()):
        if child.is_dir() and (child / "train").is_dir():
            return child
    raise FileNotFoundError(f"extracted JPEG tree {target} has no train/ folder")


def prepare_mnist_raw(data_dir: Path, cache_dir: Path) -> Path:
    """A root for ``torchvision.datasets.MNIST(root, download=False)``: the IDX files decompressed once."""
    root = Path(cache_dir) / "mnist-torchvision"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        out = raw / name
        if out.exists():
            continue
        source = Path(data_dir) / "mnist" / f"{name}.gz"
        if not source.is_file():
            raise FileNotFoundError(f"plain baseline needs {source}, which does not exist")
        temp = out.with_suffix(".tmp")
        with gzip.open(source, "rb") as src, temp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        temp.replace(out)
    return root


def plain_train_dataset(dataset: str, data_dir: Path, cache_dir: Path, mean: Sequence[float], std: Sequence[float]):
    import torchvision
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    if dataset == "mnist":
        root = prepare_mnist_raw(data_dir, cache_dir)
        # Digits are not flipped or cropped (our trainer's "auto" augmentation does the same).
        return torchvision.datasets.MNIST(str(root), train=True, download=False, transform=T.Compose(normalize))
    tree = extract_imagefolder(dataset, data_dir, cache_dir)
    augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    return torchvision.datasets.ImageFolder(str(tree / "train"), transform=T.Compose(augment + normalize))


@dataclass
class PlainRun:
    seconds: float  # the timed steps only
    samples: int
    steps: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def plain_train_steps(model: nn.Module, dataset, *, batch_size: int, lr: float, warmup_steps: int, steps: int,
                      channels_last: bool, label_smoothing: float = 0.0, num_workers: int = 2,
                      seed: int = 0) -> PlainRun:
    """Train ``warmup_steps + steps`` steps the usual way; time the last ``steps`` (data loading included)."""
    from torch.utils.data import DataLoader

    total = warmup_steps + steps
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                        generator=generator)
    if total > len(loader):
        raise ValueError(f"{total} steps asked for but one epoch has only {len(loader)} batches")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    model.train()
    start = None
    samples = 0
    iterator = iter(loader)
    for step in range(total):
        if step == warmup_steps:
            start = time.perf_counter()
        x, y = next(iterator)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step >= warmup_steps:
            samples += y.numel()
    seconds = time.perf_counter() - start
    del iterator  # shuts the worker processes down
    return PlainRun(seconds=seconds, samples=samples, steps=steps)
