"""Datasets in memory (`load_dataset`), edge partitions, and the batch pipeline (`TensorLoader`).

Modules: `dataset` (the types and the name registry), `loading` (`load_dataset`: format detection, checks),
`idx`, `cifar`, `imagefolder` (one per source format), `cache` (decoded tensors on disk), `partition`, `pipeline`.
"""

from ecavg.errors import DataError

from .dataset import DATASET_NAMES, DatasetSplits, ImageDataset
from .loading import load_dataset
from .partition import PARTITION_SCHEMES, partition_indices, partition_test_like, stratified_share
from .pipeline import TensorLoader

__all__ = [
    "DATASET_NAMES",
    "PARTITION_SCHEMES",
    "DataError",
    "DatasetSplits",
    "ImageDataset",
    "TensorLoader",
    "load_dataset",
    "partition_indices",
    "partition_test_like",
    "stratified_share",
]
