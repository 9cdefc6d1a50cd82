"""Build the MNIST sample shipped as dataset "mnist-sample" (ecavg/sample_data/mnist-sample/).

Takes a class-balanced, seeded random sample of the official MNIST files: 400 training images per
digit (4,000) and 100 test images per digit (1,000), kept in their original relative order, and
writes them as the four standard IDX files, gzip-compressed reproducibly (fixed mtime, level 9).

    python scripts/make_mnist_sample.py --source ../shared/datasets/mnist
"""

from __future__ import annotations

import argparse
import gzip
import struct
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from ecavg.data.idx import IDX_FILES, find_idx_file, read_idx  # noqa: E402  (our own IDX reader)

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
SEED = 20240601


def balanced_sample(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` random indices of every class, returned in ascending (original) order."""
    chosen = []
    for digit in range(10):
        candidates = np.flatnonzero(labels == digit)
        if len(candidates) < per_class:
            raise SystemExit(f"class {digit} has only {len(candidates)} samples, need {per_class}")
        chosen.append(rng.choice(candidates, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    # mtime=0 and no file name in the gzip header: the same input always gives the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "mnist",
                        help="folder with the official MNIST IDX files")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "ecavg" / "sample_data" / "mnist-sample")
    args = parser.parse_args()

    rng = np.random.default_rng(SEED)
    args.output.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        image_name, label_name = IDX_FILES[f"{split}_images"], IDX_FILES[f"{split}_labels"]
        image_path, label_path = find_idx_file(args.source, image_name), find_idx_file(args.source, label_name)
        if image_path is None or label_path is None:
            raise SystemExit(f"{args.source}: missing {image_name} or {label_name} (.gz or uncompressed)")
        images = read_idx(image_path, expected_ndim=3).numpy()
        labels = read_idx(label_path, expected_ndim=1).numpy()
        keep = balanced_sample(labels, per_class, rng)
        write_idx_gz(args.output / f"{image_name}.gz", images[keep])
        write_idx_gz(args.output / f"{label_name}.gz", labels[keep])
        print(f"{split}: {len(keep)} images, per class {np.bincount(labels[keep]).tolist()}")
    total = sum(p.stat().st_size for p in args.output.glob("*.gz"))
    print(f"wrote {args.output} ({total / 1e6:.3f} MB)")


if __name__ == "__main__":
    main()
