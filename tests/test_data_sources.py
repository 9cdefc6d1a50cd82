"""Dataset loading: IDX, CIFAR python batches, image folders and zips, the cache, the shipped sample."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ecavg.data import (
    DATASET_NAMES,
    DataError,
    ImageDataset,
    idx,
    imagefolder,
    load_dataset,
)
from ecavg.data.dataset import CIFAR10_CLASSES
from ecavg.data.loading import compute_mean_std

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ECAVG_CACHE_DIR", str(cache))
    return cache


# ------------------------------------------------------------------ IDX


def write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (magic if magic is not None else bytes([0, 0, 0x08, array.ndim])) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_idx_dataset(folder: Path, *, n_train: int = 30, n_test: int = 10, size: int = 8, gz: bool = True,
                     seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for i, (name, array) in enumerate(arrays.items()):
        # Mix compressed and uncompressed files when gz is True: both must be accepted.
        suffix = ".gz" if gz and i % 2 == 0 else ""
        write_idx(folder / f"{name}{suffix}", array)
    return arrays


def test_idx_round_trip_gz_and_plain(tmp_path):
    arrays = make_idx_dataset(tmp_path / "data" / "mnist")
    splits = load_dataset("mnist", tmp_path / "data")
    assert splits.name == "mnist"
    assert splits.train.images.shape == (30, 1, 8, 8) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.dtype == torch.int64
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(splits.test.labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    assert splits.train.classes == [str(d) for d in range(10)] and splits.train.num_classes == 10
    assert splits.mean == (0.1307,) and splits.std == (0.3081,)


def test_idx_in_torchvision_raw_folder(tmp_path):
    make_idx_dataset(tmp_path / "data" / "fashion-mnist" / "FashionMNIST" / "raw", gz=False)
    splits = load_dataset("fashion-mnist", tmp_path / "data")
    assert len(splits.train) == 30 and len(splits.test) == 10
    assert splits.train.classes[0] == "T-shirt/top"
    make_idx_dataset(tmp_path / "data2" / "mnist" / "raw")
    assert len(load_dataset("mnist", tmp_path / "data2").train) == 30


def test_idx_bad_magic_names_file(tmp_path):
    folder = tmp_path / "data" / "mnist"
    make_idx_dataset(folder)
    bad = folder / "t10k-images-idx3-ubyte.gz"
    write_idx(bad, np.zeros((10, 8, 8), np.uint8), magic=b"\x12\x34\x08\x03")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*magic"):
        load_dataset("mnist", tmp_path / "data")


def test_idx_count_mismatch_and_label_range(tmp_path):
    folder = tmp_path / "data" / "mnist"
    make_idx_dataset(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="10 images but .*t10k-labels-idx1-ubyte holds 9 labels"):
        load_dataset("mnist", tmp_path / "data")
    write_idx(folder / "t10k-labels-idx1-ubyte", np.full(10, 12, np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: labels span \[12, 12\]"):
        load_dataset("mnist", tmp_path / "data")


def test_idx_truncated_and_incomplete(tmp_path):
    folder = tmp_path / "data" / "mnist"
    make_idx_dataset(folder, gz=False)
    raw = (folder / "train-images-idx3-ubyte").read_bytes()
    (folder / "train-images-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: IDX header announces"):
        load_dataset("mnist", tmp_path / "data")
    (folder / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="incomplete IDX dataset, missing train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path / "data")


def test_missing_dataset_lists_what_was_looked_for(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path / "nothing")
    message = str(info.value)
    assert str(tmp_path / "nothing" / "cifar10") in message
    assert "cifar-10-batches-py" in message and "cifar-10-python.tar.gz" in message and ".zip" in message
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        load_dataset("svhn", tmp_path)


def test_download_failure_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(DataError, match=r"download of mnist into .*mnist failed.*no network.*place the files"):
        load_dataset("mnist", tmp_path / "data", download=True)


def test_download_then_read_with_our_reader(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeMNIST:  # writes what torchvision writes: <root>/MNIST/raw/<idx files>
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            make_idx_dataset(Path(root) / "MNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    splits = load_dataset("mnist", tmp_path / "data", download=True)
    assert len(splits.train) == 30
    assert calls[0] == (str(tmp_path / "data" / "mnist"), True, True)


# ------------------------------------------------------------------ CIFAR python batches


def cifar_batch(n: int, labels_key: bytes, start_label: int, num_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"test batch",
        labels_key: [(start_label + i) % num_classes for i in range(n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def make_cifar10_folder(folder: Path) -> dict[str, dict]:
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(4, b"labels", i, 10, seed=i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(3, b"labels", 7, 10, seed=9)
    names = list(CIFAR10_CLASSES)
    batches["batches.meta"] = {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 4}
    for member, content in batches.items():
        (folder / member).write_bytes(pickle.dumps(content, protocol=2))
    return batches


def test_cifar10_python_batches_folder(tmp_path):
    batches = make_cifar10_folder(tmp_path / "data" / "cifar10" / "cifar-10-batches-py")
    splits = load_dataset("cifar10", tmp_path / "data")
    assert splits.train.images.shape == (20, 3, 32, 32) and len(splits.test) == 3
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(splits.train.images, torch.from_numpy(expected))
    assert splits.train.labels[:4].tolist() == [1, 2, 3, 4]
    assert splits.test.labels.tolist() == [7, 8, 9]
    assert splits.train.classes[0] == "airplane" and splits.train.classes[9] == "truck"
    assert splits.mean == (0.4914, 0.4822, 0.4465)


def test_cifar100_tar_gz_uses_fine_labels(tmp_path):
    staging = tmp_path / "staging" / "cifar-100-python"
    staging.mkdir(parents=True)
    fine_names = [f"class{i:03d}" for i in range(100)]
    contents = {
        "train": cifar_batch(6, b"fine_labels", 95, 100, seed=1) | {b"coarse_labels": [0] * 6},
        "test": cifar_batch(2, b"fine_labels", 50, 100, seed=2) | {b"coarse_labels": [0] * 2},
        "meta": {b"fine_label_names": [n.encode() for n in fine_names], b"coarse_label_names": [b"x"] * 20},
    }
    for member, content in contents.items():
        (staging / member).write_bytes(pickle.dumps(content, protocol=2))
    dataset_dir = tmp_path / "data" / "cifar100"
    dataset_dir.mkdir(parents=True)
    with tarfile.open(dataset_dir / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(staging, arcname="cifar-100-python")
    splits = load_dataset("cifar100", tmp_path / "data")
    assert splits.train.labels.tolist() == [95, 96, 97, 98, 99, 0]
    assert splits.test.labels.tolist() == [50, 51]
    assert splits.train.num_classes == 100 and splits.train.classes[99] == "class099"
    assert torch.equal(splits.test.images, torch.from_numpy(contents["test"][b"data"].reshape(-1, 3, 32, 32)))


def test_cifar_pickle_with_foreign_global_is_refused(tmp_path):
    import collections

    folder = tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    make_cifar10_folder(folder)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": collections.OrderedDict()}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3.*refusing to load collections.OrderedDict"):
        load_dataset("cifar10", tmp_path / "data")


def test_cifar_incomplete_folder_names_missing_member(tmp_path):
    folder = tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    make_cifar10_folder(folder)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="missing test_batch"):
        load_dataset("cifar10", tmp_path / "data")


# ------------------------------------------------------------------ image folders


def colour_for(split: str, class_index: int, i: int) -> tuple[int, int, int]:
    return (40 * class_index + 10, 7 * i + (100 if split == "test" else 0), 200)


def make_image_tree(root: Path, classes=("cat", "ant", "bee"), per_class=3, size=(6, 5), mode="RGB",
                    fmt="PNG") -> None:
    for split in ("train", "test"):
        for ci, name in enumerate(sorted(classes)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                colour = colour_for(split, ci, i)
                image = Image.new("RGB", size, colour)
                if mode == "L":
                    image = image.convert("L")
                image.save(folder / f"{i:03d}.{fmt.lower()}", format=fmt)


def zip_tree(tree: Path, archive: Path, prefix: str = "") -> None:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(tree.rglob("*")):
            zf.write(path, prefix + path.relative_to(tree).as_posix())


def test_imagefolder_directory_rgb_sorted_classes(tmp_path):
    make_image_tree(tmp_path / "pets")
    splits = load_dataset(f"imagefolder:{tmp_path / 'pets'}")
    assert splits.train.classes == ["ant", "bee", "cat"]
    assert splits.train.images.shape == (9, 3, 5, 6)  # PIL size is (width, height)
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # PNG is lossless: pixel values survive exactly.
    assert splits.train.images[4, :, 0, 0].tolist() == list(colour_for("train", 1, 1))
    assert splits.test.images[0, :, 2, 3].tolist() == list(colour_for("test", 0, 0))
    # Unknown dataset: statistics computed from the training images.
    channel_means = splits.train.images.double().div(255).mean(dim=(0, 2, 3))
    assert np.allclose(splits.mean, channel_means.numpy(), atol=1e-5)


def test_imagefolder_zip_with_jpegs_and_top_folder(tmp_path):
    make_image_tree(tmp_path / "tree", fmt="JPEG", size=(16, 16))
    archive = tmp_path / "pets.zip"
    zip_tree(tmp_path / "tree", archive, prefix="pets/")
    splits = load_dataset(f"imagefolder:{archive}")
    assert splits.train.images.shape == (9, 3, 16, 16) and splits.test.images.shape == (9, 3, 16, 16)
    # JPEG is lossy; flat colours come back within a few levels.
    got = splits.train.images[7].float().mean(dim=(1, 2))
    assert torch.allclose(got, torch.tensor(colour_for("train", 2, 1), dtype=torch.float32), atol=4)


def test_imagefolder_all_grey_gives_one_channel_mixed_gives_rgb(tmp_path):
    make_image_tree(tmp_path / "grey", mode="L")
    assert load_dataset(f"imagefolder:{tmp_path / 'grey'}").train.images.shape[1] == 1
    make_image_tree(tmp_path / "mixed", mode="L")
    Image.new("RGB", (6, 5), (255, 0, 0)).save(tmp_path / "mixed" / "test" / "bee" / "red.png")
    splits = load_dataset(f"imagefolder:{tmp_path / 'mixed'}")
    assert splits.train.images.shape[1] == 3
    # Grey images are replicated over the three channels, as PIL's convert("RGB") does.
    assert torch.equal(splits.train.images[0, 0], splits.train.images[0, 2])


def test_imagefolder_mismatched_size_names_file(tmp_path):
    make_image_tree(tmp_path / "pets")
    odd = tmp_path / "pets" / "train" / "bee" / "big.png"
    Image.new("RGB", (9, 9)).save(odd)
    with pytest.raises(DataError, match=r"big\.png is 9x9 pixels.*must share one size"):
        load_dataset(f"imagefolder:{tmp_path / 'pets'}")


def test_imagefolder_missing_test_split(tmp_path):
    make_image_tree(tmp_path / "pets")
    for path in sorted((tmp_path / "pets" / "test").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (tmp_path / "pets" / "test").rmdir()
    with pytest.raises(DataError, match="test/ is missing"):
        load_dataset(f"imagefolder:{tmp_path / 'pets'}")
    zip_tree(tmp_path / "pets", tmp_path / "pets.zip")
    with pytest.raises(DataError, match="pets.zip: no train/<class>/\\* and test/<class>/\\* folders"):
        load_dataset(f"imagefolder:{tmp_path / 'pets.zip'}")


def test_imagefolder_corrupt_image_names_file(tmp_path):
    make_image_tree(tmp_path / "pets", fmt="JPEG")
    (tmp_path / "pets" / "train" / "cat" / "001.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"cat/001\.jpeg: cannot decode image"):
        load_dataset(f"imagefolder:{tmp_path / 'pets'}")


def one_line_error(*args) -> str:
    """The message of the DataError that load_dataset(*args) raises, checked to be one line."""
    with pytest.raises(DataError) as info:
        load_dataset(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_imagefolder_zip_refuses_empty_class_folder_like_a_directory(tmp_path):
    # "aardvark" sorts first: dropping it silently would shift every other class index by one.
    make_image_tree(tmp_path / "pets")
    (tmp_path / "pets" / "train" / "aardvark").mkdir()
    with pytest.raises(DataError, match="pets: train/ class folders without images: aardvark"):
        load_dataset(f"imagefolder:{tmp_path / 'pets'}")
    for prefix in ("", "pets/"):
        archive = tmp_path / f"pets{len(prefix)}.zip"
        zip_tree(tmp_path / "pets", archive, prefix=prefix)
        message = one_line_error(f"imagefolder:{archive}")
        assert message == f"{archive}: train/ class folders without images: aardvark"


def test_imagefolder_zip_class_folder_with_only_other_files_is_refused(tmp_path):
    # A zip need not hold entries for its folders: a class seen only through a non-image file counts as a folder.
    png = io_png(Image.new("RGB", (4, 4), (1, 2, 3)))
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("train", "test"):
            zf.writestr(f"{split}/bee/0.png", png)
            zf.writestr(f"{split}/cat/0.png", png)
        zf.writestr("train/ant/notes.txt", "no pictures here")
        zf.writestr("train/.hidden/notes.txt", "hidden folders are skipped, as in a directory")
        zf.writestr("train/readme.txt", "a file directly in train/ is not a class")
    with pytest.raises(DataError, match=r"pets\.zip: train/ class folders without images: ant$"):
        load_dataset(f"imagefolder:{archive}")
    # Without the image-less folder, the same zip (still without folder entries) loads.
    fixed = tmp_path / "fixed.zip"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(fixed, "w") as zf:
        for member in source.namelist():
            if not member.startswith("train/ant/"):
                zf.writestr(member, source.read(member))
    splits = load_dataset(f"imagefolder:{fixed}")
    assert splits.train.classes == ["bee", "cat"] and splits.train.labels.tolist() == [0, 1]


def io_png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_truncated_zip_is_reported_as_corrupt(tmp_path):
    make_image_tree(tmp_path / "tree")
    whole = tmp_path / "whole.zip"
    zip_tree(tmp_path / "tree", whole)
    raw = whole.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 10, 0):
        archive = tmp_path / "pets.zip"
        archive.write_bytes(raw[:cut])
        message = one_line_error(f"imagefolder:{archive}")
        assert message.startswith(f"{archive}: corrupt or truncated zip"), message
    # Damaged but named otherwise: the zip signature still gives it away.
    renamed = tmp_path / "pets.bin"
    renamed.write_bytes(raw[: len(raw) // 2])
    assert one_line_error(f"imagefolder:{renamed}").startswith(
        f"{renamed}: corrupt or truncated zip"
    )
    # Not a zip at all: still the plain "expected a directory or a .zip".
    other = tmp_path / "pets.tar"
    other.write_bytes(b"not an archive")
    with pytest.raises(DataError, match=r"pets\.tar: expected a directory or a \.zip"):
        load_dataset(f"imagefolder:{other}")
    # The same truncated zip found in a named dataset's folder.
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    (tmp_path / "data" / "cifar10" / "my-cifar.zip").write_bytes(raw[: len(raw) // 2])
    message = one_line_error("cifar10", tmp_path / "data")
    assert message.startswith(f"{tmp_path / 'data' / 'cifar10' / 'my-cifar.zip'}: corrupt or truncated zip"), message


@pytest.mark.parametrize("as_zip", [False, True])
@pytest.mark.parametrize("damage", ["unknown-format", "truncated-png"])
def test_undecodable_image_names_the_file_not_a_buffer(tmp_path, as_zip, damage):
    # PIL's own messages name the in-memory buffer ("<_io.BytesIO object at 0x...>"); ours name the file.
    make_image_tree(tmp_path / "pets")
    target = tmp_path / "pets" / "train" / "cat" / "001.png"
    noisy = Image.frombytes("RGB", (6, 5), np.random.default_rng(0).integers(0, 256, 90, dtype=np.uint8).tobytes())
    target.write_bytes(b"not an image at all" if damage == "unknown-format" else io_png(noisy)[:-30])
    if as_zip:
        zip_tree(tmp_path / "pets", tmp_path / "pets.zip")
        name, where = f"imagefolder:{tmp_path / 'pets.zip'}", f"{tmp_path / 'pets.zip'}:train/cat/001.png"
    else:
        name, where = f"imagefolder:{tmp_path / 'pets'}", str(tmp_path / "pets" / "train" / "cat" / "001.png")
    message = one_line_error(name)
    assert message.startswith(f"{where}: cannot decode image ("), message
    assert "BytesIO" not in message and " at 0x" not in message, message

def test_named_dataset_from_zip_in_its_folder(tmp_path):
    names = list(CIFAR10_CLASSES)
    make_image_tree(tmp_path / "tree", classes=names[::-1], per_class=1, size=(4, 4))
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    zip_tree(tmp_path / "tree", tmp_path / "data" / "cifar10" / "my-cifar.zip")
    splits = load_dataset("cifar10", tmp_path / "data")
    assert splits.train.classes == names and splits.train.labels.tolist() == list(range(10))
    assert splits.mean == (0.4914, 0.4822, 0.4465)  # the known statistics, not recomputed


def test_named_dataset_with_wrong_class_count(tmp_path):
    make_image_tree(tmp_path / "data" / "cifar10")  # a train/ + test/ tree with 3 classes
    with pytest.raises(DataError, match="cifar10 should have 10 classes but the files hold 3"):
        load_dataset("cifar10", tmp_path / "data")


# ------------------------------------------------------------------ cache


def test_cache_hit_does_not_decode(tmp_path, tmp_cache, monkeypatch):
    make_idx_dataset(tmp_path / "data" / "mnist")
    first = load_dataset("mnist", tmp_path / "data")
    assert len(list((tmp_cache / "datasets").glob("mnist-*.safetensors"))) == 1
    assert len(list((tmp_cache / "datasets").glob("mnist-*.json"))) == 1

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache should have been used")

    monkeypatch.setattr(idx, "read_idx", must_not_decode)
    second = load_dataset("mnist", tmp_path / "data")
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert second.train.classes == first.train.classes and second.mean == first.mean

    # A changed source file changes the key: decoded again.
    target = tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded although"):
        load_dataset("mnist", tmp_path / "data")


def test_imagefolder_cache_hit_skips_jpeg_decoding(tmp_path, monkeypatch):
    make_image_tree(tmp_path / "tree", fmt="JPEG")
    zip_tree(tmp_path / "tree", tmp_path / "pets.zip")
    first = load_dataset(f"imagefolder:{tmp_path / 'pets.zip'}")
    monkeypatch.setattr(imagefolder, "decode_images", lambda *a, **k: pytest.fail("decoded on a cache hit"))
    second = load_dataset(f"imagefolder:{tmp_path / 'pets.zip'}")
    assert torch.equal(first.train.images, second.train.images) and first.mean == second.mean


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path, tmp_cache):
    make_idx_dataset(tmp_path / "data" / "mnist")
    first = load_dataset("mnist", tmp_path / "data")
    (tensor_file,) = (tmp_cache / "datasets").glob("mnist-*.safetensors")
    tensor_file.write_bytes(b"garbage" * 10)
    with pytest.warns(RuntimeWarning, match="ignoring unreadable dataset cache"):
        rebuilt = load_dataset("mnist", tmp_path / "data")
    assert torch.equal(first.train.images, rebuilt.train.images)
    (meta_file,) = (tmp_cache / "datasets").glob("mnist-*.json")
    meta_file.write_text("{ not json")
    with pytest.warns(RuntimeWarning, match="ignoring unreadable dataset cache"):
        load_dataset("mnist", tmp_path / "data")
    # The rebuilt entry is healthy again: no warning now.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("mnist", tmp_path / "data")


def test_explicit_cache_dir_argument(tmp_path):
    make_idx_dataset(tmp_path / "data" / "mnist")
    load_dataset("mnist", tmp_path / "data", cache_dir=tmp_path / "elsewhere")
    assert list((tmp_path / "elsewhere" / "datasets").glob("mnist-*.safetensors"))


# ------------------------------------------------------------------ the shipped sample and ImageDataset


def test_mnist_sample_ships_and_loads(tmp_path):
    assert "mnist-sample" in DATASET_NAMES
    splits = load_dataset("mnist-sample", data_dir=tmp_path / "ignored")
    assert splits.train.images.shape == (4000, 1, 28, 28) and splits.test.images.shape == (1000, 1, 28, 28)
    assert splits.train.num_classes == 10
    assert splits.train.labels.bincount().tolist() == [400] * 10
    assert splits.test.labels.bincount().tolist() == [100] * 10
    assert splits.mean == (0.1307,)
    package_dir = REPO_ROOT / "ecavg" / "sample_data" / "mnist-sample"
    assert sum(p.stat().st_size for p in package_dir.glob("*.gz")) < 1_000_000


def test_image_dataset_validation_and_subset():
    images = torch.arange(5 * 4, dtype=torch.uint8).reshape(5, 1, 2, 2)
    data = ImageDataset(images, torch.tensor([0, 1, 2, 1, 0]), ["a", "b", "c"])
    assert len(data) == 5 and data.num_classes == 3
    part = data.subset(torch.tensor([4, 1]))
    assert part.labels.tolist() == [0, 1] and torch.equal(part.images[0], images[4])
    with pytest.raises(IndexError, match="5 samples"):
        data.subset(torch.tensor([5]))
    with pytest.raises(DataError, match="labels span"):
        ImageDataset(images, torch.tensor([0, 1, 2, 3, 0]), ["a", "b", "c"])
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(images.float(), torch.zeros(5, dtype=torch.int64), ["a"])
    with pytest.raises(DataError, match="5 images but 4 labels"):
        ImageDataset(images, torch.zeros(4, dtype=torch.int64), ["a"])


# ------------------------------------------------------------------ the real data (integration)


@pytest.mark.slow
@pytest.mark.integration
def test_real_cifar10_jpeg_zip_loads_in_standard_order(shared_datasets):
    root = shared_datasets
    if not (root / "cifar10").is_dir():
        pytest.skip("no cifar10/ in the shared datasets")
    splits = load_dataset("cifar10", root)
    assert splits.train.images.shape == (50000, 3, 32, 32) and splits.test.images.shape == (10000, 3, 32, 32)
    assert splits.train.classes == list(CIFAR10_CLASSES)
    assert splits.train.labels.bincount().tolist() == [5000] * 10
    assert splits.test.labels.bincount().tolist() == [1000] * 10
    # The decoded pixels match CIFAR-10's known channel means (JPEG shifts them only slightly).
    means = compute_mean_std(splits.train.images[::10])[0]
    assert np.allclose(means, (0.4914, 0.4822, 0.4465), atol=0.01)
