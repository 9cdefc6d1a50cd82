"""Image-folder datasets `train/<class>/*` + `test/<class>/*`, as a directory or inside a `.zip`, and image decoding.

Both forms follow the same rules: classes are the train/ folders (sorted, numerically if all are numbers), a train/
class folder without images is refused (it would shift every later class index), and every test/ class must exist
in train/. Images are decoded once into one uint8 tensor; JPEGs in batches through torchvision, the rest via PIL.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ecavg.errors import DataError

from .dataset import DataSource, ImageDataset

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# PIL modes that hold a single grey channel (alpha, where present, is dropped).
_GREY_PIL_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_JPEG_MAGIC = b"\xff\xd8\xff"
_ZIP_MAGIC = b"PK"
_DECODE_CHUNK = 4096


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


def imagefolder_source(path: Path, name: str) -> DataSource:
    """The image-folder dataset at `path` (a directory or a zip), as named by `imagefolder:<path>`."""
    if path.is_dir():
        return imagefolder_dir_source(path, name)
    if path.is_file():
        if zipfile.is_zipfile(path):
            return imagefolder_zip_source(path, name)
        if _looks_like_zip(path):
            try:
                zipfile.ZipFile(path).close()
            except (zipfile.BadZipFile, OSError, ValueError) as err:
                raise corrupt_zip_error(path, err) from err
    raise DataError(f"{path}: expected a directory or a .zip holding train/<class>/* and test/<class>/* images")


def _looks_like_zip(path: Path) -> bool:
    if path.suffix.lower() == ".zip":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    except OSError:
        return False


def corrupt_zip_error(path: Path, err: Exception) -> DataError:
    """The error for a zip whose directory cannot be read (a truncated download, a damaged file)."""
    return DataError(f"{path}: corrupt or truncated zip, its directory cannot be read ({type(err).__name__}: {err})")


# --------------------------------------------------------------------------------------------
# A directory tree
# --------------------------------------------------------------------------------------------


def imagefolder_dir_source(root: Path, name: str) -> DataSource:
    """The images under `root/train/<class>/` and `root/test/<class>/` (listed now, decoded on a cache miss)."""
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

    return DataSource("imagefolder-dir", [Path(p) for p in fingerprint_files], read, str(root))


def _class_dir_names(root: Path) -> list[str]:
    return [
        p.name
        for p in sorted((root / "train").iterdir())
        if p.is_dir() and not p.name.startswith(".")
    ]


# --------------------------------------------------------------------------------------------
# A zip
# --------------------------------------------------------------------------------------------


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


def zip_tree_prefix_of_file(path: Path) -> str | None:
    """Where the train/ and test/ folders are inside the zip at `path` ('' or 'x/'); None if not there or unreadable."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _zip_tree_prefix(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return None


def imagefolder_zip_source(path: Path, name: str) -> DataSource:
    """The image-folder tree inside the zip at `path` (not opened until read, so a cache hit only stats it)."""

    def read() -> tuple[ImageDataset, ImageDataset]:
        try:
            with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
                member_names = archive.namelist()
                prefix = _zip_tree_prefix(member_names)
                if prefix is None:
                    raise DataError(
                        f"{path}: no train/<class>/* and test/<class>/* folders inside "
                        f"(at the top level or under one top-level folder)"
                    )
                with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    files = list(_zip_image_files(path, archive, mapped, prefix))
                    class_dir_names = _zip_class_dir_names(member_names, prefix)
                    return _decode_image_folder(files, str(path), class_dir_names=class_dir_names)
        except zipfile.BadZipFile as err:
            raise corrupt_zip_error(path, err) from err
        except (OSError, ValueError) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{path}: cannot read zip ({type(err).__name__}: {err})") from err

    return DataSource("imagefolder-zip", [path], read, str(path))


def _zip_class_dir_names(member_names: list[str], prefix: str) -> list[str]:
    """The train/<class>/ folders in the zip, with or without images (what `_class_dir_names` is for a directory)."""
    train = prefix + "train/"
    names = set()
    for member in member_names:
        if member.startswith(train):
            parts = member[len(train):].split("/")
            # "train/<class>/" (the folder's own entry) or "train/<class>/<anything>"; not a file directly in train/.
            if len(parts) >= 2 and parts[0] and not parts[0].startswith("."):
                names.add(parts[0])
    return sorted(names)


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


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


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

    images = decode_images([f.read_bytes for f in files], [f.where for f in files])
    labels = torch.tensor([class_index[f.class_name] for f in files], dtype=torch.int64)
    is_train = torch.tensor([f.split == "train" for f in files], dtype=torch.bool)
    train = ImageDataset(images[is_train], labels[is_train], classes)
    test = ImageDataset(images[~is_train], labels[~is_train], list(classes))
    return train, test


def decode_images(readers: list[Callable[[], bytes]], names: list[str]) -> torch.Tensor:
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
    except Exception:  # noqa: BLE001 - whatever failed, PIL is the fallback
        return None  # one bad file fails the whole batch; PIL then decodes one by one and names it


def _decode_with_pil(blob: bytes, file_name: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    buffer = io.BytesIO(blob)
    try:
        with Image.open(buffer) as image:
            image.load()
            converted = image.convert("L" if image.mode in _GREY_PIL_MODES else "RGB")
    except UnidentifiedImageError as err:
        raise DataError(f"{file_name}: cannot decode image (not in an image format that PIL recognises)") from err
    except Exception as err:
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"), which says nothing: file_name is the name.
        detail = " ".join(str(err).replace(repr(buffer), "").split())
        raise DataError(f"{file_name}: cannot decode image ({type(err).__name__}: {detail})") from err
    array = np.array(converted, dtype=np.uint8)  # a writable copy
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))
