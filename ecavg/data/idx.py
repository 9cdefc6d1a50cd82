"""MNIST / Fashion-MNIST in the IDX format: the four official files, each `.gz` or uncompressed."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch

from ecavg.errors import DataError

from .dataset import DataSource, ImageDataset, check_label_range

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_file(directory: Path, base: str) -> Path | None:
    """`directory/base` or `directory/base.gz`, whichever is a file (uncompressed first); None if neither."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def idx_source(directory: Path, classes: list[str] | None) -> DataSource | None:
    """The four IDX files in `directory`; None if none are there, DataError if only some are.

    `classes` names the labels; None names them "0".."<max label>".
    """
    if not directory.is_dir():
        return None
    found = {key: find_idx_file(directory, base) for key, base in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, path in found.items() if path is None]
    if len(missing) == len(found):
        return None
    if missing:
        raise DataError(f"{directory}: incomplete IDX dataset, missing {', '.join(missing)} (.gz or uncompressed)")
    paths: dict[str, Path] = {key: path for key, path in found.items() if path is not None}

    def read() -> tuple[ImageDataset, ImageDataset]:
        splits = []
        for split in ("train", "test"):
            images_path, labels_path = paths[f"{split}_images"], paths[f"{split}_labels"]
            images = read_idx(images_path, expected_ndim=3)
            labels = read_idx(labels_path, expected_ndim=1).to(torch.int64)
            if images.shape[0] != labels.shape[0]:
                raise DataError(
                    f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
                )
            class_names = classes or [str(c) for c in range(int(labels.max()) + 1 if labels.numel() else 0)]
            check_label_range(labels, len(class_names), labels_path)
            splits.append(ImageDataset(images.unsqueeze(1).contiguous(), labels, class_names))
        return splits[0], splits[1]

    return DataSource("idx", [paths[key] for key in IDX_FILES], read, str(directory))


def read_idx(path: Path, *, expected_ndim: int) -> torch.Tensor:
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
