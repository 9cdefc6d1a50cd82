"""The decoded-tensor cache: each dataset is decoded once per version of its source files.

Entries live under `<cache dir>/datasets/` (cache dir: $ECAVG_CACHE_DIR, else ~/.cache/ecavg), keyed by the
dataset's name, the source kind and the source files' paths, sizes and mtimes. An unreadable entry is ignored with
a warning and rebuilt; a cache that cannot be written only warns, so a read-only disk never stops an experiment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

from ecavg.errors import DataError
from ecavg.fileio import atomic_path, write_text_atomic

from .dataset import DatasetSplits, DataSource, ImageDataset

# Bump when the decoding or the cache layout changes, so old cache entries are not reused.
CACHE_FORMAT_VERSION = 1

_CACHE_TENSORS = ("train_images", "train_labels", "test_images", "test_labels")


def default_cache_dir() -> Path:
    """$ECAVG_CACHE_DIR, else ~/.cache/ecavg."""
    env = os.environ.get("ECAVG_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ecavg"


def source_fingerprint(name: str, source: DataSource) -> str:
    """The cache key of `name` read from `source`: changes when a source file's path, size or mtime does."""
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


class DatasetCache:
    """<root>/<name>-<key>.safetensors (uint8 images, int64 labels) + .json (classes, stats, fingerprint)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _paths(self, name: str, fingerprint: str) -> tuple[Path, Path]:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-60:] or "dataset"
        stem = f"{safe}-{fingerprint[:24]}"
        return self.root / f"{stem}.safetensors", self.root / f"{stem}.json"

    def load(self, name: str, fingerprint: str) -> DatasetSplits | None:
        """The cached splits, or None (with a warning if an entry is there but unreadable)."""
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
        except Exception as err:  # noqa: BLE001 - any unreadable entry is rebuilt, never fatal
            # stacklevel 3: the warning points at whoever called load_dataset.
            warnings.warn(
                f"ignoring unreadable dataset cache {tensors_path} ({type(err).__name__}: {err}); rebuilding it",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def save(self, splits: DatasetSplits, fingerprint: str, source_description: str) -> None:
        """Write the entry (tensors first, then the JSON that makes it count); warn instead of failing."""
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
            with atomic_path(tensors_path) as tmp:
                save_file(tensors, str(tmp))
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
            write_text_atomic(meta_path, json.dumps(meta, indent=1))
        except Exception as err:  # noqa: BLE001 - a read-only or full disk must not stop the experiment
            warnings.warn(f"could not write dataset cache {tensors_path} ({type(err).__name__}: {err})",
                          RuntimeWarning, stacklevel=3)
