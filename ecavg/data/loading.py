"""`load_dataset`: from a dataset name to its train and test splits in memory, as uint8 tensors.

Supported sources:

* MNIST / Fashion-MNIST in the IDX format (`.gz` or uncompressed, optionally under `raw/`), see `idx`,
* CIFAR-10 / CIFAR-100 "python version" batches (folder or the official `.tar.gz`), see `cifar`,
* image folders `train/<class>/*` + `test/<class>/*`, as a directory or inside a `.zip`, see `imagefolder`,
* the small MNIST sample shipped with the package (`mnist-sample`).

This module finds which format a dataset folder holds and checks the result against the known datasets; the
format modules read, and `cache` keeps the decoded tensors so a dataset is decoded once per source version.
"""

from __future__ import annotations

import importlib.resources
import os
from contextlib import ExitStack
from pathlib import Path

import torch

from ecavg.errors import DataError

from .cache import DatasetCache, default_cache_dir, source_fingerprint
from .cifar import CIFAR_LAYOUTS, cifar_source
from .dataset import (
    IMAGEFOLDER_PREFIX,
    KNOWN_DATASETS,
    DatasetSplits,
    DataSource,
    ImageDataset,
    canonical_dataset_name,
    known_class_names,
)
from .idx import IDX_FILES, idx_source
from .imagefolder import (
    imagefolder_dir_source,
    imagefolder_source,
    imagefolder_zip_source,
    zip_tree_prefix_of_file,
)

# torchvision's dataset classes, used only for download=True (and to find the raw/ folder they write).
_TORCHVISION_CLASS = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> DatasetSplits:
    """Load a dataset's train and test splits into memory.

    `name` is one of DATASET_NAMES or `imagefolder:<path>`. A named dataset X is read from
    `<data_dir>/X/` (data_dir defaults to $ECAVG_DATA_DIR, else `./data`), which may hold the
    official files, a `train/`+`test/` image-folder tree, or one `.zip` holding such a tree.
    Decoded tensors are cached under `<cache_dir>/datasets/` (cache_dir defaults to
    $ECAVG_CACHE_DIR, else ~/.cache/ecavg) keyed by the source files' paths, sizes and mtimes.
    """
    canonical = canonical_dataset_name(name)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    with ExitStack() as stack:
        source = _resolve_source(canonical, data_dir, download, stack)
        fingerprint = source_fingerprint(canonical, source)
        cache = DatasetCache(cache_root / "datasets")
        cached = cache.load(canonical, fingerprint)
        if cached is not None:
            return cached
        train, test = source.read()
        train, test = _check_against_known(canonical, train, test, source.description)
        mean, std = _normalisation(canonical, train)
        splits = DatasetSplits(canonical, train, test, mean, std)
        cache.save(splits, fingerprint, source.description)
        return splits


# --------------------------------------------------------------------------------------------
# Finding the source files
# --------------------------------------------------------------------------------------------


def _resolve_source(name: str, data_dir: str | Path | None, download: bool, stack: ExitStack) -> DataSource:
    if name.startswith(IMAGEFOLDER_PREFIX):
        return imagefolder_source(Path(name[len(IMAGEFOLDER_PREFIX):]), name)

    if name == "mnist-sample":
        package_dir = importlib.resources.files("ecavg.sample_data").joinpath("mnist-sample")
        sample_dir = stack.enter_context(importlib.resources.as_file(package_dir))
        source = idx_source(Path(sample_dir), known_class_names(name))
        if source is None:
            raise DataError(f"the packaged MNIST sample is missing from {sample_dir}; reinstall ecavg")
        return source

    root = Path(data_dir if data_dir is not None else os.environ.get("ECAVG_DATA_DIR", "data")).expanduser()
    dataset_dir = root / name
    source = _detect_in_dir(name, dataset_dir)
    if source is not None:
        return source
    if download:
        _download_with_torchvision(name, dataset_dir)
        source = _detect_in_dir(name, dataset_dir)
        if source is not None:
            return source
        raise DataError(
            f"torchvision reported a successful download of {name} into {dataset_dir}, "
            f"but the expected files are not there: {_what_we_look_for(name)}"
        )
    where = "" if dataset_dir.is_dir() else " (the directory does not exist)"
    raise DataError(
        f"{name} not found in {dataset_dir}{where}. Looked for {_what_we_look_for(name)}. "
        f"Put the files there, point data_dir at their parent folder, or pass download=True."
    )


def _what_we_look_for(name: str) -> str:
    tree = "an image-folder tree train/<class>/* and test/<class>/*, or one .zip holding such a tree"
    if name in ("mnist", "fashion-mnist"):
        files = ", ".join(IDX_FILES.values())
        return f"the IDX files {files} (each .gz or uncompressed, directly there or under raw/), or {tree}"
    layout = CIFAR_LAYOUTS[name]
    return f"{layout.folder}/ ({', '.join(layout.members)}), or {layout.archive}, or {tree}"


def _detect_in_dir(name: str, dataset_dir: Path) -> DataSource | None:
    """Which format `dataset_dir` holds: the official one first, then an image-folder tree, then a zip."""
    if not dataset_dir.is_dir():
        return None
    if name in ("mnist", "fashion-mnist"):
        torchvision_raw = dataset_dir / _TORCHVISION_CLASS[name] / "raw"
        for candidate in (dataset_dir, dataset_dir / "raw", torchvision_raw):
            source = idx_source(candidate, known_class_names(name))
            if source is not None:
                return source
    else:
        source = cifar_source(name, dataset_dir)
        if source is not None:
            return source
    if (dataset_dir / "train").is_dir() or (dataset_dir / "test").is_dir():
        return imagefolder_dir_source(dataset_dir, name)
    zips = sorted(p for p in dataset_dir.glob("*.zip") if p.is_file())
    if len(zips) == 1:
        # Not opened here: on a cache hit the (possibly large) zip is only stat'ed, never parsed.
        return imagefolder_zip_source(zips[0], name)
    if len(zips) > 1:
        usable = [p for p in zips if zip_tree_prefix_of_file(p) is not None]
        if len(usable) != 1:
            raise DataError(
                f"{dataset_dir} holds {len(zips)} zips ({', '.join(p.name for p in zips)}) of which "
                f"{len(usable)} hold train/<class>/* and test/<class>/* folders; keep exactly one"
            )
        return imagefolder_zip_source(usable[0], name)
    return None


def _download_with_torchvision(name: str, dataset_dir: Path) -> None:
    try:
        import torchvision.datasets as tv_datasets

        dataset_class = getattr(tv_datasets, _TORCHVISION_CLASS[name])
        dataset_dir.mkdir(parents=True, exist_ok=True)
        # torchvision checks the archive checksums; we then read the files it wrote with our own readers.
        dataset_class(root=str(dataset_dir), train=True, download=True)
        dataset_class(root=str(dataset_dir), train=False, download=True)
    except Exception as err:  # no network, mirror down, disk full, ...
        raise DataError(
            f"download of {name} into {dataset_dir} failed ({type(err).__name__}: {err}). "
            f"Without network access, place the files in {dataset_dir} yourself: {_what_we_look_for(name)}"
        ) from err


# --------------------------------------------------------------------------------------------
# Checks and normalisation
# --------------------------------------------------------------------------------------------


def _check_against_known(
    name: str, train: ImageDataset, test: ImageDataset, where: str
) -> tuple[ImageDataset, ImageDataset]:
    if train.image_shape != test.image_shape:
        raise DataError(f"{where}: train images are {train.image_shape} but test images are {test.image_shape}")
    known = KNOWN_DATASETS.get(name)
    if known is None:
        return train, test
    if train.num_classes != known.num_classes:
        raise DataError(
            f"{where}: {name} should have {known.num_classes} classes but the files hold {train.num_classes} "
            f"({', '.join(train.classes[:12])}{', ...' if train.num_classes > 12 else ''})"
        )
    if known.classes is not None:
        found = train.classes
        standard = list(known.classes)
        if set(found) == set(standard) and found != standard:
            # The standard names in another order: relabel to the standard order.
            remap = torch.tensor([standard.index(c) for c in found], dtype=torch.int64)
            train = ImageDataset(train.images, remap[train.labels], standard)
            test = ImageDataset(test.images, remap[test.labels], list(standard))
        elif all(c.isdigit() for c in found) and [int(c) for c in found] == list(range(len(standard))):
            # Folders named by label index ("0".."9"): give them the standard class names.
            train = ImageDataset(train.images, train.labels, standard)
            test = ImageDataset(test.images, test.labels, list(standard))
        # Otherwise keep the folder names in their sorted order.
    return train, test


def _normalisation(name: str, train: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    known = KNOWN_DATASETS.get(name)
    if known is not None and known.channels == train.images.shape[1]:
        return known.mean, known.std
    return compute_mean_std(train.images)


def compute_mean_std(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 [N, C, H, W] images on the [0, 1] scale (float64 sums)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        raise DataError("cannot compute normalisation statistics of an empty training set")
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)
