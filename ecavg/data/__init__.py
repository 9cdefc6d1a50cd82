"""Datasets in memory (`load_dataset`), edge partitions, and the batch pipeline (`TensorLoader`)."""

from .partition import PARTITION_SCHEMES, partition_indices, partition_test_like
from .pipeline import TensorLoader
from .sources import DATASET_NAMES, DataError, DatasetSplits, ImageDataset, load_dataset

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
]
