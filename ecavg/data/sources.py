"""Loading image-classification datasets into memory as uint8 tensors.

Supported sources (see `load_dataset`):

* MNIST / Fashion-MNIST in the IDX format (`.gz` or uncompressed, optionally under `raw/`),
* CIFAR-10 / CIFAR-100 "python version" batches (folder or the official `.tar.gz`),
* image folders `train/<class>/*` + `test/<class>/*`, as a directory or inside a `.zip`,
* the small MNIST sample shipped with the package (`mnist-sample`).

Decoded tensors are cached as safetensors so a dataset is decoded once per source version.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
import json
import math
import mmap
import os
import pickle
import re
import struct
import tarfile
import tempfile
import warnings
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from ecavg.errors import DataError

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "DatasetSplits",
    "ImageDataset",
    "load_dataset",
    "default_cache_dir",
]

# Bump when the decoding or the cache layout changes, so old cache entries are not reused.
CACHE_FORMAT_VERSION = 1

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

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# PIL modes that hold a single grey channel (alpha, where present, is dropped).
_GREY_PIL_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_JPEG_MAGIC = b"\xff\xd8\xff"
_DECODE_CHUNK = 4096



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

    def subset(self, indices: torch.Tensor) -> "ImageDataset":
        """A new dataset holding copies of the samples at `indices` (any integer tensor or sequence)."""
        index = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device).reshape(-1)
        if index.numel() and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise IndexError(
                f"subset indices span [{int(index.min())}, {int(index.max())}] but the dataset has {len(self)} samples"
            )
        return ImageDataset(self.images[index], self.labels[index], list(self.classes))


@dataclass
class DatasetSplits:
    name: str
    train: ImageDataset
    test: ImageDataset
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]


@dataclass(frozen=True)
class _KnownDataset:
    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None  # None: take them from the files


_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_DIGIT_CLASSES = tuple(str(d) for d in range(10))

# Per-channel statistics of the official training sets on the [0, 1] scale.
_KNOWN: dict[str, _KnownDataset] = {
    "mnist": _KnownDataset(10, 1, (0.1307,), (0.3081,), _DIGIT_CLASSES),
    "mnist-sample": _KnownDataset(10, 1, (0.1307,), (0.3081,), _DIGIT_CLASSES),
    "fashion-mnist": _KnownDataset(10, 1, (0.2860,), (0.3530,), _FASHION_CLASSES),
    "cifar10": _KnownDataset(10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), _CIFAR10_CLASSES),
    "cifar100": _KnownDataset(100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), None),
}

# torchvision's dataset classes, used only for download=True.
_TORCHVISION_CLASS = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_CIFAR_LAYOUT = {
    # name: (folder, archive, train members, test member, meta member, label key, label-names key)
    "cifar10": (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        "test",
        "meta",
        b"fine_labels",
        b"fine_label_names",
    ),
}


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$ECAVG_CACHE_DIR, else ~/.cache/ecavg."""
    env = os.environ.get("ECAVG_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ecavg"


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
    canonical = _canonical_name(name)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    with ExitStack() as stack:
        source = _resolve_source(canonical, data_dir, download, stack)
        fingerprint = _fingerprint(canonical, source)
        cache = _DatasetCache(cache_root / "datasets")
        cached = cache.load(canonical, fingerprint)
        if cached is not None:
            return cached
        train, test = source.read()
        train, test = _check_against_known(canonical, train, test, source.description)
        mean, std = _normalisation(canonical, train)
        splits = DatasetSplits(canonical, train, test, mean, std)
        cache.save(splits, fingerprint, source.description)
        return splits


def _canonical_name(name: str) -> str:
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


# --------------------------------------------------------------------------------------------
# Finding the source files
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    kind: str  # idx | cifar-folder | cifar-archive | imagefolder-dir | imagefolder-zip
    files: list[Path]  # what the cache key fingerprints
    read: Callable[[], tuple[ImageDataset, ImageDataset]]
    description: str  # for messages


def _resolve_source(name: str, data_dir: str | Path | None, download: bool, stack: ExitStack) -> _Source:
    if name.startswith(IMAGEFOLDER_PREFIX):
        path = Path(name[len(IMAGEFOLDER_PREFIX):])
        if path.is_dir():
            source = _imagefolder_dir_source(path, name)
        elif path.is_file() and zipfile.is_zipfile(path):
            source = _imagefolder_zip_source(path, name)
        else:
            source = None
        if source is None:
            raise DataError(
                f"{path}: expected a directory or a .zip holding train/<class>/* and test/<class>/* images"
            )
        return source

    if name == "mnist-sample":
        package_dir = importlib.resources.files("ecavg.sample_data").joinpath("mnist-sample")
        sample_dir = stack.enter_context(importlib.resources.as_file(package_dir))
        source = _idx_source(Path(sample_dir), name)
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
        files = ", ".join(_IDX_FILES.values())
        return f"the IDX files {files} (each .gz or uncompressed, directly there or under raw/), or {tree}"
    folder, archive, train_members, test_member, meta_member, _, _ = _CIFAR_LAYOUT[name]
    members = ", ".join((*train_members, test_member, meta_member))
    return f"{folder}/ ({members}), or {archive}, or {tree}"


def _detect_in_dir(name: str, dataset_dir: Path) -> _Source | None:
    """Which format `dataset_dir` holds: the official one first, then an image-folder tree, then a zip."""
    if not dataset_dir.is_dir():
        return None
    if name in ("mnist", "fashion-mnist"):
        torchvision_raw = dataset_dir / _TORCHVISION_CLASS[name] / "raw"
        for candidate in (dataset_dir, dataset_dir / "raw", torchvision_raw):
            source = _idx_source(candidate, name)
            if source is not None:
                return source
    else:
        source = _cifar_source(name, dataset_dir)
        if source is not None:
            return source
    if (dataset_dir / "train").is_dir() or (dataset_dir / "test").is_dir():
        return _imagefolder_dir_source(dataset_dir, name)
    zips = sorted(p for p in dataset_dir.glob("*.zip") if p.is_file())
    if len(zips) == 1:
        # Not opened here: on a cache hit the (possibly large) zip is only stat'ed, never parsed.
        return _imagefolder_zip_source(zips[0], name)
    if len(zips) > 1:
        usable = [p for p in zips if _zip_tree_prefix_of_file(p) is not None]
        if len(usable) != 1:
            raise DataError(
                f"{dataset_dir} holds {len(zips)} zips ({', '.join(p.name for p in zips)}) of which "
                f"{len(usable)} hold train/<class>/* and test/<class>/* folders; keep exactly one"
            )
        return _imagefolder_zip_source(usable[0], name)
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
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------


def _find_idx_file(directory: Path, base: str) -> Path | None:
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_source(directory: Path, name: str) -> _Source | None:
    """The four IDX files in `directory`; None if none are there, DataError if only some are."""
    if not directory.is_dir():
        return None
    found = {key: _find_idx_file(directory, base) for key, base in _IDX_FILES.items()}
    missing = [_IDX_FILES[key] for key, path in found.items() if path is None]
    if len(missing) == len(found):
        return None
    if missing:
        raise DataError(f"{directory}: incomplete IDX dataset, missing {', '.join(missing)} (.gz or uncompressed)")
    paths: dict[str, Path] = {key: path for key, path in found.items() if path is not None}
    classes = list(_KNOWN[name].classes) if name in _KNOWN and _KNOWN[name].classes else None

    def read() -> tuple[ImageDataset, ImageDataset]:
        splits = []
        for split in ("train", "test"):
            images_path, labels_path = paths[f"{split}_images"], paths[f"{split}_labels"]
            images = _read_idx(images_path, expected_ndim=3)
            labels = _read_idx(labels_path, expected_ndim=1).to(torch.int64)
            if images.shape[0] != labels.shape[0]:
                raise DataError(
                    f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
                )
            class_names = classes or [str(c) for c in range(int(labels.max()) + 1 if labels.numel() else 0)]
            _check_label_range(labels, len(class_names), labels_path)
            splits.append(ImageDataset(images.unsqueeze(1).contiguous(), labels, class_names))
        return splits[0], splits[1]

    return _Source("idx", [paths[key] for key in _IDX_FILES], read, str(directory))


def _read_idx(path: Path, *, expected_ndim: int) -> torch.Tensor:
    """Parse an IDX file of unsigned bytes (magic 0x0000 08 <ndim>, big-endian dims, then data)."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    type_code, ndim = raw[2], raw[3]
    if type_code != 0x08:
        raise DataError(f"{path}: IDX element type 0x{type_code:02x} is not unsigned byte (0x08)")
    if ndim != expected_ndim:
        raise DataError(f"{path}: IDX magic says {ndim} dimensions, expected {expected_ndim}")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = math.prod(dims)
    payload = len(raw) - header_size
    if payload != expected:
        raise DataError(f"{path}: IDX header announces {dims} = {expected} bytes of data but the file holds {payload}")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)
    return torch.from_numpy(array.copy())


def _check_label_range(labels: torch.Tensor, num_classes: int, path: Path | str) -> None:
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{path}: labels span [{low}, {high}] but there are {num_classes} classes")


# --------------------------------------------------------------------------------------------
# CIFAR python batches
# --------------------------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays, lists, dicts, bytes and numbers.

    The CIFAR python batches are pickles. We only ever unpickle local files the user placed in
    the data directory (or that torchvision downloaded and checksummed), never bytes from a
    network; refusing every other global additionally means a tampered file cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes with protocol 2
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy>=2 renamed the module
        return super().find_class(module, name)


def _unpickle_local(stream: io.BufferedIOBase | io.RawIOBase, where: str) -> dict:
    try:
        # Local files only (see _NumpyOnlyUnpickler); encoding="bytes" reads the Python 2 pickles.
        obj = _NumpyOnlyUnpickler(stream, encoding="bytes").load()
    except Exception as err:
        raise DataError(f"{where}: not a readable CIFAR python batch ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _cifar_source(name: str, dataset_dir: Path) -> _Source | None:
    folder_name, archive_name, train_members, test_member, meta_member, label_key, names_key = _CIFAR_LAYOUT[name]
    members = (*train_members, test_member, meta_member)
    for folder in (dataset_dir / folder_name, dataset_dir):
        present = [m for m in members if (folder / m).is_file()]
        if not present:
            continue
        missing = [m for m in members if m not in present]
        if missing:
            raise DataError(f"{folder}: incomplete {name} python batches, missing {', '.join(missing)}")
        paths = [folder / m for m in members]

        def read_folder(folder: Path = folder) -> tuple[ImageDataset, ImageDataset]:
            def open_member(member: str) -> tuple[dict, str]:
                path = folder / member
                with open(path, "rb") as f:
                    return _unpickle_local(f, str(path)), str(path)

            return _assemble_cifar(name, open_member)

        return _Source("cifar-folder", paths, read_folder, str(folder))

    archive = dataset_dir / archive_name
    if archive.is_file():

        def read_archive() -> tuple[ImageDataset, ImageDataset]:
            try:
                with tarfile.open(archive, "r:*") as tar:
                    by_member: dict[str, tarfile.TarInfo] = {}
                    for info in tar.getmembers():
                        if info.isfile():
                            parts = info.name.split("/")
                            if len(parts) >= 2 and parts[-2] == folder_name and parts[-1] in members:
                                by_member[parts[-1]] = info
                    missing = [m for m in members if m not in by_member]
                    if missing:
                        raise DataError(f"{archive}: missing {', '.join(f'{folder_name}/{m}' for m in missing)}")

                    def open_member(member: str) -> tuple[dict, str]:
                        where = f"{archive}:{by_member[member].name}"
                        stream = tar.extractfile(by_member[member])
                        if stream is None:
                            raise DataError(f"{where}: cannot read archive member")
                        with stream:
                            return _unpickle_local(stream, where), where

                    return _assemble_cifar(name, open_member)
            except (tarfile.TarError, OSError, EOFError) as err:
                raise DataError(f"{archive}: cannot read archive ({type(err).__name__}: {err})") from err

        return _Source("cifar-archive", [archive], read_archive, str(archive))
    return None


def _assemble_cifar(
    name: str, open_member: Callable[[str], tuple[dict, str]]
) -> tuple[ImageDataset, ImageDataset]:
    _, _, train_members, test_member, meta_member, label_key, names_key = _CIFAR_LAYOUT[name]
    meta, meta_where = open_member(meta_member)
    raw_names = meta.get(names_key)
    if not isinstance(raw_names, (list, tuple)) or not raw_names:
        raise DataError(f"{meta_where}: missing the class-name list {names_key!r}")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw_names]

    def read_batches(member_names: tuple[str, ...]) -> ImageDataset:
        images, labels = [], []
        for member in member_names:
            batch, where = open_member(member)
            data = batch.get(b"data")
            if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                shape = getattr(data, "shape", None)
                raise DataError(
                    f"{where}: b'data' must be a uint8 array [N, 3072], found {type(data).__name__} {shape}"
                )
            if data.dtype != np.uint8:
                raise DataError(f"{where}: b'data' has dtype {data.dtype}, expected uint8")
            batch_labels = batch.get(label_key)
            if batch_labels is None:
                raise DataError(f"{where}: missing the label list {label_key!r}")
            label_tensor = torch.as_tensor(np.asarray(batch_labels, dtype=np.int64)).reshape(-1)
            if label_tensor.shape[0] != data.shape[0]:
                raise DataError(f"{where}: {data.shape[0]} images but {label_tensor.shape[0]} labels")
            _check_label_range(label_tensor, len(classes), where)
            images.append(torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy()))
            labels.append(label_tensor)
        return ImageDataset(torch.cat(images), torch.cat(labels), list(classes))

    return read_batches(train_members), read_batches((test_member,))


# --------------------------------------------------------------------------------------------
# Image folders (directory or zip)
# --------------------------------------------------------------------------------------------


@dataclass
class _ImageFile:
    split: str  # "train" | "test"
    class_name: str
    where: str  # path for messages
    read_bytes: Callable[[], bytes]


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _sorted_classes(names: set[str]) -> list[str]:
    # Numeric folder names ("0".."99") sort by value so "10" comes after "9"; others alphabetically.
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _imagefolder_dir_source(root: Path, name: str) -> _Source:
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root}: image-folder dataset needs both train/ and test/ subfolders; {split}/ is missing")
    files: list[_ImageFile] = []
    for split in ("train", "test"):
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = []
            for dirpath, dirnames, filenames in os.walk(class_dir):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found.extend(Path(dirpath) / f for f in filenames if _is_image_name(f))
            for path in sorted(found):
                files.append(_ImageFile(split, class_dir.name, str(path), path.read_bytes))
    fingerprint_files = [f.where for f in files]

    def read() -> tuple[ImageDataset, ImageDataset]:
        return _decode_image_folder(files, str(root), class_dir_names=_class_dir_names(root))

    return _Source("imagefolder-dir", [Path(p) for p in fingerprint_files], read, str(root))


def _class_dir_names(root: Path) -> list[str]:
    return [
        p.name
        for p in sorted((root / "train").iterdir())
        if p.is_dir() and not p.name.startswith(".")
    ]


def _zip_tree_prefix(member_names: list[str]) -> str | None:
    """'' if the zip has train/ and test/ at its top, 'x/' if under one top folder x, else None."""
    tops: dict[str, set[str]] = {}
    for member in member_names:
        if member.startswith("__MACOSX/"):
            continue
        parts = member.split("/")
        if len(parts) >= 2:
            tops.setdefault("", set()).add(parts[0])
        if len(parts) >= 3:
            tops.setdefault(parts[0] + "/", set()).add(parts[1])
    if {"train", "test"} <= tops.get("", set()):
        return ""
    candidates = [p for p, subdirs in tops.items() if p and {"train", "test"} <= subdirs]
    return candidates[0] if len(candidates) == 1 else None


def _zip_tree_prefix_of_file(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            return _zip_tree_prefix(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return None


def _imagefolder_zip_source(path: Path, name: str) -> _Source:
    def read() -> tuple[ImageDataset, ImageDataset]:
        try:
            with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
                prefix = _zip_tree_prefix(archive.namelist())
                if prefix is None:
                    raise DataError(
                        f"{path}: no train/<class>/* and test/<class>/* folders inside "
                        f"(at the top level or under one top-level folder)"
                    )
                with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    files = list(_zip_image_files(path, archive, mapped, prefix))
                    return _decode_image_folder(files, str(path), class_dir_names=None)
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{path}: cannot read zip ({type(err).__name__}: {err})") from err

    return _Source("imagefolder-zip", [path], read, str(path))


def _zip_image_files(path: Path, archive: zipfile.ZipFile, mapped: mmap.mmap, prefix: str) -> Iterator[_ImageFile]:
    infos = []
    for info in archive.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        parts = info.filename[len(prefix):].split("/")
        if len(parts) < 3 or parts[0] not in ("train", "test") or not _is_image_name(info.filename):
            continue
        infos.append((parts[0], parts[1], info))
    infos.sort(key=lambda item: (item[0] != "train", item[1], item[2].filename))
    for split, class_name, info in infos:
        yield _ImageFile(split, class_name, f"{path}:{info.filename}", _zip_member_reader(archive, mapped, info))


def _zip_member_reader(archive: zipfile.ZipFile, mapped: mmap.mmap, info: zipfile.ZipInfo) -> Callable[[], bytes]:
    # Stored (uncompressed, unencrypted) members are sliced straight from the memory map, which is
    # several times faster than ZipFile.read for tens of thousands of small JPEGs; the JPEG decoder
    # still rejects damaged data. Everything else goes through zipfile (with its CRC check).
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
        offset = info.header_offset
        if mapped[offset:offset + 4] == b"PK\x03\x04":
            name_len, extra_len = struct.unpack_from("<HH", mapped, offset + 26)
            start = offset + 30 + name_len + extra_len
            end = start + info.compress_size
            if end <= len(mapped):
                return lambda: mapped[start:end]
    return lambda: archive.read(info)


def _decode_image_folder(
    files: list[_ImageFile], where: str, *, class_dir_names: list[str] | None
) -> tuple[ImageDataset, ImageDataset]:
    train_classes = {f.class_name for f in files if f.split == "train"}
    if class_dir_names:
        empty = sorted(set(class_dir_names) - train_classes)
        if empty:
            raise DataError(f"{where}: train/ class folders without images: {', '.join(empty)}")
    if not train_classes:
        raise DataError(f"{where}: train/ holds no images in class subfolders (train/<class>/<image>)")
    if not any(f.split == "test" for f in files):
        raise DataError(f"{where}: test/ holds no images in class subfolders (test/<class>/<image>)")
    unknown = sorted({f.class_name for f in files if f.split == "test"} - train_classes)
    if unknown:
        raise DataError(f"{where}: test/ has classes that train/ lacks: {', '.join(unknown)}")
    classes = _sorted_classes(train_classes)
    class_index = {c: i for i, c in enumerate(classes)}

    images = _decode_images([f.read_bytes for f in files], [f.where for f in files])
    labels = torch.tensor([class_index[f.class_name] for f in files], dtype=torch.int64)
    is_train = torch.tensor([f.split == "train" for f in files], dtype=torch.bool)
    train = ImageDataset(images[is_train], labels[is_train], classes)
    test = ImageDataset(images[~is_train], labels[~is_train], list(classes))
    return train, test


def _decode_images(readers: list[Callable[[], bytes]], names: list[str]) -> torch.Tensor:
    """Decode all images to one uint8 [N, C, H, W] tensor: C=1 if every image is grey, else RGB."""
    decoded: list[torch.Tensor] = []
    for start in range(0, len(readers), _DECODE_CHUNK):
        chunk_names = names[start:start + _DECODE_CHUNK]
        blobs = []
        for reader, file_name in zip(readers[start:start + _DECODE_CHUNK], chunk_names):
            try:
                blobs.append(reader())
            except Exception as err:
                raise DataError(f"{file_name}: cannot read ({type(err).__name__}: {err})") from err
        decoded.extend(_decode_chunk(blobs, chunk_names))
    if not decoded:
        raise DataError("no images to decode")

    reference = decoded[0].shape[1:]
    for image, file_name in zip(decoded, names):
        if image.shape[1:] != reference:
            raise DataError(
                f"{file_name} is {image.shape[2]}x{image.shape[1]} pixels but {names[0]} is "
                f"{reference[1]}x{reference[0]}; all images of a dataset must share one size"
            )
    channels = 1 if all(image.shape[0] == 1 for image in decoded) else 3
    out = torch.empty((len(decoded), channels, *reference), dtype=torch.uint8)
    for start in range(0, len(decoded), _DECODE_CHUNK):
        part = [image.expand(channels, -1, -1) for image in decoded[start:start + _DECODE_CHUNK]]
        torch.stack(part, out=out[start:start + len(part)])
    return out


def _decode_chunk(blobs: list[bytes], names: list[str]) -> list[torch.Tensor]:
    """Each image as uint8 [1 or 3, H, W]; JPEGs in one batched torchvision call, the rest via PIL."""
    results: list[torch.Tensor | None] = [None] * len(blobs)
    jpeg_positions = [i for i, blob in enumerate(blobs) if blob[:3] == _JPEG_MAGIC]
    if jpeg_positions:
        batch = _decode_jpeg_batch([blobs[i] for i in jpeg_positions])
        if batch is not None:
            for position, image in zip(jpeg_positions, batch):
                if image.shape[0] in (1, 3):  # CMYK and other oddities go through PIL below
                    results[position] = image
    for i, image in enumerate(results):
        if image is None:
            results[i] = _decode_with_pil(blobs[i], names[i])
    return results  # type: ignore[return-value]


def _decode_jpeg_batch(blobs: list[bytes]) -> list[torch.Tensor] | None:
    """torchvision's libjpeg-turbo decoder on a list (about 4x faster than PIL); None if unusable."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 marks its image codecs deprecated; they still work and are the fast path.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            return list(decode_jpeg(tensors, mode=ImageReadMode.UNCHANGED))
    except Exception:
        return None  # one bad file fails the whole batch; PIL then decodes one by one and names it


def _decode_with_pil(blob: bytes, file_name: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            converted = image.convert("L" if image.mode in _GREY_PIL_MODES else "RGB")
    except Exception as err:
        raise DataError(f"{file_name}: cannot decode image ({type(err).__name__}: {err})") from err
    array = np.array(converted, dtype=np.uint8)  # a writable copy
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


# --------------------------------------------------------------------------------------------
# Checks and normalisation
# --------------------------------------------------------------------------------------------


def _check_against_known(
    name: str, train: ImageDataset, test: ImageDataset, where: str
) -> tuple[ImageDataset, ImageDataset]:
    if train.image_shape != test.image_shape:
        raise DataError(f"{where}: train images are {train.image_shape} but test images are {test.image_shape}")
    known = _KNOWN.get(name)
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
    known = _KNOWN.get(name)
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


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _fingerprint(name: str, source: _Source) -> str:
    entries = []
    for path in source.files:
        try:
            stat = path.stat()
        except OSError as err:
            raise DataError(f"{path}: cannot stat ({err})") from err
        entries.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    payload = json.dumps(
        {"format_version": CACHE_FORMAT_VERSION, "dataset": name, "kind": source.kind, "files": entries},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


_CACHE_TENSORS = ("train_images", "train_labels", "test_images", "test_labels")


class _DatasetCache:
    """<root>/<name>-<key>.safetensors (uint8 images, int64 labels) + .json (classes, stats, fingerprint)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _paths(self, name: str, fingerprint: str) -> tuple[Path, Path]:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-60:] or "dataset"
        stem = f"{safe}-{fingerprint[:24]}"
        return self.root / f"{stem}.safetensors", self.root / f"{stem}.json"

    def load(self, name: str, fingerprint: str) -> DatasetSplits | None:
        tensors_path, meta_path = self._paths(name, fingerprint)
        if not meta_path.exists() or not tensors_path.exists():
            return None
        try:
            from safetensors.torch import load_file

            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format_version") != CACHE_FORMAT_VERSION or meta.get("fingerprint") != fingerprint:
                raise ValueError("fingerprint or format version does not match")
            if meta.get("tensor_bytes") != tensors_path.stat().st_size:
                raise ValueError("tensor file size differs from the one recorded")
            tensors = load_file(str(tensors_path))
            for key in _CACHE_TENSORS:
                if key not in tensors:
                    raise ValueError(f"missing tensor {key}")
            classes = [str(c) for c in meta["classes"]]
            train = ImageDataset(tensors["train_images"], tensors["train_labels"], classes)
            test = ImageDataset(tensors["test_images"], tensors["test_labels"], list(classes))
            mean = tuple(float(v) for v in meta["mean"])
            std = tuple(float(v) for v in meta["std"])
            if len(mean) != train.images.shape[1] or len(std) != train.images.shape[1]:
                raise ValueError("normalisation statistics do not match the channel count")
            return DatasetSplits(name, train, test, mean, std)
        except Exception as err:
            warnings.warn(
                f"ignoring unreadable dataset cache {tensors_path} ({type(err).__name__}: {err}); rebuilding it",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def save(self, splits: DatasetSplits, fingerprint: str, source_description: str) -> None:
        tensors_path, meta_path = self._paths(splits.name, fingerprint)
        try:
            from safetensors.torch import save_file

            self.root.mkdir(parents=True, exist_ok=True)
            tensors = {
                "train_images": splits.train.images.contiguous(),
                "train_labels": splits.train.labels.contiguous(),
                "test_images": splits.test.images.contiguous(),
                "test_labels": splits.test.labels.contiguous(),
            }
            _atomic_write(tensors_path, lambda tmp: save_file(tensors, str(tmp)))
            meta = {
                "format_version": CACHE_FORMAT_VERSION,
                "dataset": splits.name,
                "source": source_description,
                "fingerprint": fingerprint,
                "classes": splits.train.classes,
                "mean": list(splits.mean),
                "std": list(splits.std),
                "tensor_bytes": tensors_path.stat().st_size,
            }
            # The JSON is written last: a cache entry counts only once both files are complete.
            _atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8"))
        except Exception as err:  # a read-only or full disk must not stop the experiment
            warnings.warn(f"could not write dataset cache {tensors_path} ({type(err).__name__}: {err})",
                          RuntimeWarning, stacklevel=3)


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
