"""CIFAR-10 / CIFAR-100 "python version" batches, as their folder or the official `.tar.gz`."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ecavg.errors import DataError

from .dataset import DataSource, ImageDataset, check_label_range


@dataclass(frozen=True)
class CifarLayout:
    folder: str  # the folder the official archive unpacks to
    archive: str  # the official archive's file name
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_key: bytes  # in each batch
    names_key: bytes  # in the meta member

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train_members, self.test_member, self.meta_member)


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": CifarLayout(
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        "test",
        "meta",
        b"fine_labels",
        b"fine_label_names",
    ),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays, lists, dicts, bytes and numbers.

    The CIFAR python batches are pickles. We only ever unpickle local files the user placed in
    the data directory (or that torchvision downloaded and checksummed), never bytes from a
    network; refusing every other global additionally means a tampered file cannot run code.
    """

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes with protocol 2
    })

    def find_class(self, module: str, name: str):
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


def cifar_source(name: str, dataset_dir: Path) -> DataSource | None:
    """The python batches of `name` ("cifar10" or "cifar100") in `dataset_dir`: unpacked (in the official folder or
    directly there) or the official archive; None if neither is there, DataError if a folder is incomplete."""
    layout = CIFAR_LAYOUTS[name]
    members = layout.members
    for folder in (dataset_dir / layout.folder, dataset_dir):
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

            return _assemble_cifar(layout, open_member)

        return DataSource("cifar-folder", paths, read_folder, str(folder))

    archive = dataset_dir / layout.archive
    if archive.is_file():

        def read_archive() -> tuple[ImageDataset, ImageDataset]:
            try:
                with tarfile.open(archive, "r:*") as tar:
                    by_member: dict[str, tarfile.TarInfo] = {}
                    for info in tar.getmembers():
                        if info.isfile():
                            parts = info.name.split("/")
                            if len(parts) >= 2 and parts[-2] == layout.folder and parts[-1] in members:
                                by_member[parts[-1]] = info
                    missing = [m for m in members if m not in by_member]
                    if missing:
                        raise DataError(f"{archive}: missing {', '.join(f'{layout.folder}/{m}' for m in missing)}")

                    def open_member(member: str) -> tuple[dict, str]:
                        where = f"{archive}:{by_member[member].name}"
                        stream = tar.extractfile(by_member[member])
                        if stream is None:
                            raise DataError(f"{where}: cannot read archive member")
                        with stream:
                            return _unpickle_local(stream, where), where

                    return _assemble_cifar(layout, open_member)
            except (tarfile.TarError, OSError, EOFError) as err:
                raise DataError(f"{archive}: cannot read archive ({type(err).__name__}: {err})") from err

        return DataSource("cifar-archive", [archive], read_archive, str(archive))
    return None


def _assemble_cifar(
    layout: CifarLayout, open_member: Callable[[str], tuple[dict, str]]
) -> tuple[ImageDataset, ImageDataset]:
    meta, meta_where = open_member(layout.meta_member)
    raw_names = meta.get(layout.names_key)
    if not isinstance(raw_names, (list, tuple)) or not raw_names:
        raise DataError(f"{meta_where}: missing the class-name list {layout.names_key!r}")
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
            batch_labels = batch.get(layout.label_key)
            if batch_labels is None:
                raise DataError(f"{where}: missing the label list {layout.label_key!r}")
            label_tensor = torch.as_tensor(np.asarray(batch_labels, dtype=np.int64)).reshape(-1)
            if label_tensor.shape[0] != data.shape[0]:
                raise DataError(f"{where}: {data.shape[0]} images but {label_tensor.shape[0]} labels")
            check_label_range(label_tensor, len(classes), where)
            images.append(torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy()))
            labels.append(label_tensor)
        return ImageDataset(torch.cat(images), torch.cat(labels), list(classes))

    return read_batches(layout.train_members), read_batches((layout.test_member,))
